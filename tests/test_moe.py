"""model/moe.py: the grouped MoE layer against its per-token reference and against Hugging Face's GPT-OSS and
GraniteMoE experts, routing without drops, and the router losses.

Tolerances:
- fp32, MoE vs moe_ref: atol 1e-5 and rtol 1e-5, elementwise, for the output and the gradients of x and of every
  parameter (router weight and bias, w_gate_up, w_down, b_gate_up, b_down).
- bf16, MoE vs moe_ref: parameters and x rounded to bf16; the reference is moe_ref in fp32 on those same rounded
  values (so input rounding is not counted as error), with the same routing (asserted). Error is
  max |x - ref| / max |ref| per tensor: output <= 1e-2 and gradients <= 2e-2 (bf16 rounding of one result is
  2^-9 ~ 2e-3 relative; measured <= 9.4e-3 for the output and <= 1.2e-2 for the gradients).
- torch._grouped_mm vs the loop over experts: fp32, atol 1e-6 and rtol 1e-6.
- Router losses vs transformers' load_balancing_loss_func and the z-loss formula: atol 1e-6, rtol 0; their
  gradients on the router weight: atol 1e-6, rtol 1e-5.
- Experts vs transformers' GptOssMLP / GraniteMoeMoE (fp32, weights copied across layouts): atol 1e-5, rtol 1e-5.
"""

import pytest
import torch
from transformers import GptOssConfig, GraniteMoeConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func as hf_load_balancing_loss
from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeMoE

import model.moe as moe_module
from model.moe import MoE, grouped_mm, moe_ref

DIM, FFN, E = 24, 20, 5
B, T = 2, 7  # N = 14 tokens

# swiglu_limit for the reference tests: gate/up pre-activations are ~ N(0, 1.5^2), so about a sixth of the gates and
# a third of the ups are clamped while every value stays O(1). Reaching the default limit of 7 takes weights that
# make outputs and gradients ~100, where summation order alone moves fp32 results by 4e-5 (> atol 1e-5). The
# default limit (and alpha) are checked against transformers' GPT-OSS below, with rtol doing the work.
LIMIT = 1.5


def make_moe(activation="silu", bias=False, router_bias=False, top_k=2, seed=0, limit=LIMIT, **kwargs) -> MoE:
    """A MoE with random O(1) weights, biases included (nonzero)."""
    torch.manual_seed(seed)
    moe = MoE(DIM, FFN, E, top_k, activation=activation, bias=bias, router_bias=router_bias, swiglu_limit=limit,
              **kwargs)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.5)
        moe.w_gate_up.normal_(std=0.3)  # (2 * ffn, dim) rows: pre-activations ~ N(0, 1.5^2)
        moe.w_down.normal_(std=0.2)
    return moe


def make_x(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=g)  # (B, T, dim)
    grad_out = torch.randn(B, T, DIM, generator=g)  # (B, T, dim)
    return x.to(dtype), grad_out.to(dtype)


def forward_backward(fn, moe: MoE, x: torch.Tensor, grad_out: torch.Tensor):
    """Output and {name: grad} (x included) of fn(moe, x), after backward with grad_out."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = fn(moe, x)
    y.backward(grad_out)
    grads = {name: p.grad.clone() for name, p in moe.named_parameters()}
    grads["x"] = x.grad.clone()
    return y.detach(), grads


def grouped(moe, x):
    return moe(x)[0]


def routing(moe: MoE, x: torch.Tensor):
    """(top-k expert indices (N, k), softmax weights over the chosen logits (N, k)), computed independently."""
    logits = moe.router(x.reshape(-1, DIM)).float()  # (N, E)
    top, experts = torch.topk(logits, moe.top_k, dim=-1)
    return experts, torch.softmax(top, dim=-1)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("top_k", [1, 2, 5])
@pytest.mark.parametrize("router_bias", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gpt_oss"])
def test_moe_matches_reference_fp32(activation, bias, router_bias, top_k):
    moe = make_moe(activation, bias, router_bias, top_k)
    x, grad_out = make_x()
    y, grads = forward_backward(grouped, moe, x, grad_out)
    y_ref, grads_ref = forward_backward(moe_ref, moe, x, grad_out)
    expected_names = {"x", "router.weight", "w_gate_up", "w_down"} | ({"router.bias"} if router_bias else set()) \
        | ({"b_gate_up", "b_down"} if bias else set())
    assert set(grads) == expected_names
    assert y.abs().max() > 0.1  # a real output, not zeros on both sides
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name in expected_names:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    if top_k > 1:  # with k = 1 the single weight is softmax of one logit = 1, so the router gets no gradient
        assert grads["router.weight"].abs().max() > 1e-3
    if activation == "gpt_oss":  # the clamp is exercised: some gate/up pre-activations are beyond the limit
        h = torch.einsum("nd,efd->nef", x.reshape(-1, DIM), moe.w_gate_up)  # (N, E, 2 * ffn)
        h = h + moe.b_gate_up if bias else h
        assert (h > moe.limit).any() and (h[..., FFN:] < -moe.limit).any()


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("activation", ["silu", "gpt_oss"])
def test_moe_bf16_against_fp32_reference(activation, top_k):
    """With the default limit of 7, which these O(1) values never reach: a pre-activation within bf16 rounding of
    the limit would be clamped on one side and not the other, a jump in its gradient no tolerance should absorb
    (seen at limit 1.5: 4 of 1120 values flip and the w_gate_up gradient differs by 10%)."""
    moe = make_moe(activation, bias=True, router_bias=True, top_k=top_k, limit=7.0).to(torch.bfloat16)
    x, grad_out = make_x(torch.bfloat16)
    moe32 = make_moe(activation, bias=True, router_bias=True, top_k=top_k, limit=7.0)
    moe32.load_state_dict({k: v.float() for k, v in moe.state_dict().items()})  # the same bf16-rounded weights
    assert torch.equal(routing(moe, x)[0], routing(moe32, x.float())[0]), "bf16 rounding changed the routing"

    y, grads = forward_backward(grouped, moe, x, grad_out)
    y_ref, grads_ref = forward_backward(moe_ref, moe32, x.float(), grad_out.float())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) <= 1e-2
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16
        if top_k == 1 and name.startswith("router."):  # one chosen logit: its weight is 1, no gradient
            assert grads_ref[name].abs().max() == 0 and g.abs().max() == 0
            continue
        assert rel_err(g, grads_ref[name]) <= 2e-2, name


# --- torch._grouped_mm against the loop over experts ---------------------------------------------------------

needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"),
                                      reason=f"torch {torch.__version__} has no torch._grouped_mm")


@needs_grouped_mm
@pytest.mark.parametrize("counts", [[3, 0, 4, 1, 2], [0, 5, 0, 5, 0], [10, 0, 0, 0, 0], [2, 2, 2, 2, 2]])
def test_grouped_mm_matches_loop(counts):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), DIM, generator=g)  # (M, in)
    w = torch.randn(E, 2 * FFN, DIM, generator=g)  # (E, out, in)
    y = grouped_mm(x, w, counts, use_grouped=True)
    y_loop = grouped_mm(x, w, counts, use_grouped=False)
    assert y.shape == (x.shape[0], 2 * FFN)
    torch.testing.assert_close(y, y_loop, atol=1e-6, rtol=1e-6)
    start = 0
    for e, c in enumerate(counts.tolist()):  # and the loop is the definition: block e times w[e]^T
        torch.testing.assert_close(y_loop[start:start + c], x[start:start + c] @ w[e].T, atol=1e-6, rtol=1e-6)
        start += c


@needs_grouped_mm
@pytest.mark.parametrize("activation", ["silu", "gpt_oss"])
def test_moe_forward_grouped_matches_loop(activation, monkeypatch):
    """The whole layer through torch._grouped_mm (forced on: on CPU only its forward exists) equals the loop, with
    experts 1 and 4 (the last) receiving no tokens."""
    moe = make_moe(activation, bias=True, router_bias=True, top_k=2)
    with torch.no_grad():
        moe.router.bias[1] = moe.router.bias[4] = -100.0
    x, _ = make_x()
    with torch.no_grad():
        y_loop, losses = moe(x)
        counts = losses.tokens_per_expert.clone()
        monkeypatch.setattr(moe_module, "grouped_supported", lambda x: True)
        y_grouped, _ = moe(x)
    assert counts[1] == 0 and counts[4] == 0 and counts.sum() == B * T * 2
    torch.testing.assert_close(y_grouped, y_loop, atol=1e-6, rtol=1e-6)


# --- routing: no token is dropped -----------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_tokens_per_expert_counts_every_pick(top_k):
    moe = make_moe(top_k=top_k)
    x, _ = make_x()
    _, losses = moe(x)
    experts, _ = routing(moe, x)
    assert losses.tokens_per_expert.dtype == torch.int64
    assert int(losses.tokens_per_expert.sum()) == B * T * top_k
    assert torch.equal(losses.tokens_per_expert, torch.bincount(experts.reshape(-1), minlength=E))
    assert torch.equal(moe.tokens_per_expert, losses.tokens_per_expert)


def test_no_capacity_drop_when_all_tokens_pick_the_same_experts():
    """Every token routed to experts 0 and 3: each gets all N tokens and the output still equals the reference."""
    moe = make_moe(bias=True, router_bias=True, top_k=2)
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 49.0, 0.0]))
    x, _ = make_x()
    with torch.no_grad():
        y, losses = moe(x)
        y_ref = moe_ref(moe, x)
    assert losses.tokens_per_expert.tolist() == [B * T, 0, 0, B * T, 0]
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


# --- router losses --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_load_balancing_loss_matches_transformers(top_k):
    moe = make_moe(router_bias=True, top_k=top_k, aux_loss_coef=1.0)
    x, _ = make_x()
    _, losses = moe(x)
    logits = moe.router(x.reshape(-1, DIM))  # (N, E)
    expected = hf_load_balancing_loss((logits,), num_experts=E, top_k=top_k)
    assert losses.aux_loss.dtype == torch.float32 and losses.aux_loss.shape == ()
    torch.testing.assert_close(losses.aux_loss, expected, atol=1e-6, rtol=0)

    # the gradient reaches the router (through the mean probabilities; the pick counts are constants)
    moe.zero_grad(set_to_none=True)
    losses.aux_loss.backward()
    ours = moe.router.weight.grad.clone()
    moe.zero_grad(set_to_none=True)
    hf_load_balancing_loss((moe.router(x.reshape(-1, DIM)),), num_experts=E, top_k=top_k).backward()
    if top_k < E:
        assert ours.abs().max() > 1e-4
    else:  # every expert picked by every token: f_e = 1, the loss is E * sum_e P_e = E, a constant
        torch.testing.assert_close(losses.aux_loss, torch.tensor(float(E)), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, moe.router.weight.grad, atol=1e-6, rtol=1e-5)
    assert moe.w_gate_up.grad is None  # the experts do not take part in the aux loss


def test_z_loss_and_combined_coefficients():
    x, _ = make_x()
    moe = make_moe(router_bias=True, z_loss_coef=1.0)
    _, losses = moe(x)
    logits = moe.router(x.reshape(-1, DIM))
    z = torch.logsumexp(logits, dim=-1).square().mean()
    assert z > 0.1
    torch.testing.assert_close(losses.aux_loss, z, atol=1e-6, rtol=0)
    losses.aux_loss.backward()
    ours = moe.router.weight.grad.clone()
    moe.zero_grad(set_to_none=True)
    torch.logsumexp(moe.router(x.reshape(-1, DIM)), dim=-1).square().mean().backward()
    assert ours.abs().max() > 1e-3
    torch.testing.assert_close(ours, moe.router.weight.grad, atol=1e-6, rtol=1e-5)

    moe = make_moe(router_bias=True, aux_loss_coef=0.01, z_loss_coef=0.001)
    _, losses = moe(x)
    expected = 0.01 * hf_load_balancing_loss((logits,), num_experts=E, top_k=2) + 0.001 * z
    torch.testing.assert_close(losses.aux_loss, expected, atol=1e-6, rtol=0)


def test_router_losses_zero_and_not_computed_without_coefficients():
    moe = make_moe(router_bias=True)
    x, _ = make_x()
    _, losses = moe(x)
    assert losses.aux_loss.dtype == torch.float32
    assert losses.aux_loss.item() == 0.0
    assert not losses.aux_loss.requires_grad  # not built from the logits at all: no graph behind it


# --- experts against transformers -----------------------------------------------------------------------------

def test_gpt_oss_experts_match_transformers():
    """GptOssMLP (router + experts, interleaved gate/up in (E, in, out) layout) with its weights copied into ours."""
    top_k = 2
    config = GptOssConfig(hidden_size=DIM, intermediate_size=FFN, num_local_experts=E, num_experts_per_tok=top_k,
                          experts_implementation="eager")
    torch.manual_seed(0)
    hf = GptOssMLP(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.5)
        hf.experts.gate_up_proj.normal_(std=0.6)  # some gate/up values beyond the limit, so the clamp counts
    ours = MoE(DIM, FFN, E, top_k, activation="gpt_oss", bias=True, router_bias=True)
    assert (ours.alpha, ours.limit) == (config.swiglu_alpha, config.swiglu_limit)  # our defaults are GPT-OSS's
    with torch.no_grad():
        ours.router.weight.copy_(hf.router.weight)
        ours.router.bias.copy_(hf.router.bias)
        for e in range(E):
            gate_up = hf.experts.gate_up_proj[e]  # (dim, 2 * ffn), gate and up interleaved
            ours.w_gate_up[e] = torch.cat([gate_up[:, 0::2].T, gate_up[:, 1::2].T])  # (2 * ffn, dim)
            ours.w_down[e] = hf.experts.down_proj[e].T  # (dim, ffn)
            bias = hf.experts.gate_up_proj_bias[e]
            ours.b_gate_up[e] = torch.cat([bias[0::2], bias[1::2]])
        ours.b_down.copy_(hf.experts.down_proj_bias)
    x, _ = make_x()
    with torch.no_grad():
        h = torch.einsum("nd,edf->nef", x.reshape(-1, DIM), hf.experts.gate_up_proj)  # (N, E, 2 * ffn)
        assert (h[..., 0::2] > config.swiglu_limit).any() and (h[..., 1::2].abs() > config.swiglu_limit).any()
        y_hf, _ = hf(x)
        y, _ = ours(x)
    assert y.abs().max() > 0.1
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)


def test_granite_experts_match_transformers():
    """GraniteMoeMoE stores experts exactly in our layout: gate_up_proj (E, 2I, D) and down_proj (E, D, I)."""
    top_k = 2
    config = GraniteMoeConfig(hidden_size=DIM, intermediate_size=FFN, num_local_experts=E,
                              num_experts_per_tok=top_k, experts_implementation="eager")
    torch.manual_seed(0)
    hf = GraniteMoeMoE(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.5)
    ours = MoE(DIM, FFN, E, top_k, activation="silu")
    assert ours.w_gate_up.shape == hf.experts.gate_up_proj.shape and ours.w_down.shape == hf.experts.down_proj.shape
    with torch.no_grad():
        ours.router.weight.copy_(hf.router.weight)
        ours.w_gate_up.copy_(hf.experts.gate_up_proj)
        ours.w_down.copy_(hf.experts.down_proj)
    x, _ = make_x()
    with torch.no_grad():
        y_hf = hf(x)
        y, _ = ours(x)
    assert y.abs().max() > 0.1
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)


def test_invalid_configuration_raises():
    with pytest.raises(ValueError, match="activation 'gelu' unknown"):
        MoE(DIM, FFN, E, 2, activation="gelu")
    with pytest.raises(ValueError, match=r"top_k \(6\) must be in 1..n_experts \(5\)"):
        MoE(DIM, FFN, E, 6)
    with pytest.raises(ValueError, match=r"top_k \(0\)"):
        MoE(DIM, FFN, E, 0)


def test_padded_rows_align_every_expert_block():
    """_grouped_mm's input: expert e's rows land, in order, in a block starting at a multiple of GROUP_ALIGN."""
    from model.moe import GROUP_ALIGN, _padded_rows

    counts = torch.tensor([3, 0, 9, 8, 1])
    dest, ends, n_padded = _padded_rows(counts, int(counts.sum()))
    assert n_padded == 21 + 5 * (GROUP_ALIGN - 1)
    assert ends.tolist() == [8, 8, 24, 32, 40] and ends.dtype == torch.int32
    starts = [0, 8, 8, 24, 32]
    expected = [s + i for s, c in zip(starts, counts.tolist()) for i in range(c)]
    assert dest.tolist() == expected
