"""The loss contract of every family's forward (model.loss.LossOutput, model.causal_lm.Trunk), in fp32 on CPU.

For Llama, Gemma2 (final softcap), GPT-OSS and GraniteMoE (logits scaling, router aux losses on), each with the fused
linear cross-entropy on and off, on a batch of two rows packed with four documents, one crossing the row boundary:

- reduction="none": token_losses (B, T) equal F.cross_entropy(reduction="none") on the full logits of the same
  model (times loss_weights), sample_losses their sums over each document taken here by hand, sample_tokens the
  learnable positions per document exactly; the gradients of every parameter of an objective that uses loss_sum,
  token_losses and sample_losses at once equal the reference's: atol 1e-5 (sums of up to 24 losses: rtol 1e-6).
- the fused path never calls the output head (no (tokens x vocab) logits): the head's forward raises if it is.
- reduction="sum" (the default) carries no per-token tensors and equals the reference sums and gradients;
  loss_weights multiply the per-token losses, n_tokens stays the unweighted count.
- a batch without a learnable token gives 0 everywhere, no NaN, in every reduction, with and without weights.
- return_hidden=True and trunk() give the final hidden states, from which the head gives forward's logits, and
  the router aux loss that LossOutput carries.
"""

import pytest
import torch
import torch.nn.functional as F

from model.batch import IGNORE_INDEX, Batch
from model.causal_lm import Trunk
from test_packed import FAMILIES, VOCAB, tiny_model

ATOL, SUM_RTOL = 1e-5, 1e-6
B, T = 2, 12
OFFSETS = [0, 5, 14, 19, 24]  # the second document runs from row 0 into row 1


def make_batch(weights: bool = True, learnable: bool = True) -> Batch:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.25] = IGNORE_INDEX  # prompts
    flat = labels.view(-1)
    for end in OFFSETS[1:]:
        flat[end - 1] = IGNORE_INDEX  # each document's last position
    if not learnable:
        labels.fill_(IGNORE_INDEX)
    positions = torch.cat([torch.arange(b - a) for a, b in zip(OFFSETS, OFFSETS[1:])]).view(B, T)
    w = 2 * torch.rand(B, T, generator=g) if weights else None
    return Batch(ids, labels, positions, torch.tensor(OFFSETS, dtype=torch.int32), loss_weights=w)


def reference(model, batch: Batch) -> dict:
    """Full logits from forward, then F.cross_entropy per token; document sums by hand."""
    logits = model(batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens)  # (B, T, V)
    token = F.cross_entropy(logits.reshape(-1, VOCAB).float(), batch.labels.reshape(-1), reduction="none",
                            ignore_index=IGNORE_INDEX)  # (B*T,)
    learnable = batch.labels.reshape(-1) != IGNORE_INDEX
    if batch.loss_weights is not None:
        token = token * batch.loss_weights.reshape(-1)
    sample_losses = torch.stack([token[a:b].sum() for a, b in zip(OFFSETS, OFFSETS[1:])])
    sample_tokens = torch.tensor([int(learnable[a:b].sum()) for a, b in zip(OFFSETS, OFFSETS[1:])])
    n_correct = ((logits.reshape(-1, VOCAB).argmax(-1) == batch.labels.reshape(-1)) & learnable).sum()
    return dict(loss_sum=token.sum(), n_tokens=learnable.sum(), n_correct=n_correct, token_losses=token.view(B, T),
                sample_losses=sample_losses, sample_tokens=sample_tokens)


def objective(out) -> torch.Tensor:
    """loss_sum and fixed random multiples of the per-token and per-sample losses: gradients through all three."""
    g = torch.Generator().manual_seed(11)
    r_token, r_sample = torch.randn(B, T, generator=g), torch.randn(len(OFFSETS) - 1, generator=g)
    get = out.get if isinstance(out, dict) else out._asdict().get
    return get("loss_sum") + (get("token_losses") * r_token).sum() + (get("sample_losses") * r_sample).sum()


def grads_of(model, loss: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def moe_model(family: str, fused: bool):
    extra = dict(aux_loss_coef=0.01, z_loss_coef=0.001) if family in ("gpt_oss", "granite_moe") else {}
    return tiny_model(family, "eager", fused=fused, n_layers=2, **extra)


def no_head_calls(model, monkeypatch):
    def refuse(*_):
        raise AssertionError("the fused loss must not compute the (tokens x vocab) logits through the head")

    monkeypatch.setattr(model.output, "forward", refuse)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reduction_none_matches_reference(family, fused, monkeypatch):
    model = moe_model(family, fused)
    batch = make_batch()
    ref = reference(model, batch)
    ref_grads = grads_of(model, objective(ref))
    with monkeypatch.context() as m:
        if fused:
            no_head_calls(model, m)
        out = model(batch, reduction="none")
        grads = grads_of(model, objective(out))
    torch.testing.assert_close(out.token_losses, ref["token_losses"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.sample_losses, ref["sample_losses"], atol=ATOL, rtol=SUM_RTOL)
    torch.testing.assert_close(out.loss_sum, ref["loss_sum"], atol=ATOL, rtol=SUM_RTOL)
    assert out.token_losses.dtype == out.sample_losses.dtype == torch.float32
    assert torch.equal(out.sample_tokens, ref["sample_tokens"]) and out.sample_tokens.dtype == torch.int64
    assert int(out.n_tokens) == int(ref["n_tokens"]) and int(out.n_correct) == int(ref["n_correct"])
    assert (out.token_losses[batch.labels == IGNORE_INDEX] == 0).all()
    assert_grads_equal(grads, ref_grads)
    if family in ("gpt_oss", "granite_moe"):
        assert float(out.aux_loss.detach()) > 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reduction_sum_is_the_fast_path_and_weights_multiply(family, fused):
    model = moe_model(family, fused)
    plain = make_batch(weights=False)
    ref = reference(model, plain)
    ref_grads = grads_of(model, ref["loss_sum"])
    out = model(plain)  # reduction="sum"
    assert out.token_losses is None and out.sample_losses is None and out.sample_tokens is None
    torch.testing.assert_close(out.loss_sum, ref["loss_sum"], atol=ATOL, rtol=SUM_RTOL)
    assert int(out.n_tokens) == int(ref["n_tokens"]) and int(out.n_correct) == int(ref["n_correct"])
    assert_grads_equal(grads_of(model, out.loss_sum), ref_grads)
    # the tensor arguments give the Batch's result
    same = model(plain.input_ids, plain.labels, plain.position_ids, cu_seqlens=plain.cu_seqlens)
    assert torch.equal(same.loss_sum, out.loss_sum)

    weighted = make_batch(weights=True)
    ref_w = reference(model, weighted)
    ref_w_grads = grads_of(model, ref_w["loss_sum"])
    out_w = model(weighted)
    assert out_w.token_losses is None
    torch.testing.assert_close(out_w.loss_sum, ref_w["loss_sum"], atol=ATOL, rtol=SUM_RTOL)
    assert int(out_w.n_tokens) == int(ref["n_tokens"])  # unweighted
    assert abs(float(out_w.loss_sum.detach()) - float(out.loss_sum.detach())) > 1.0  # the weights do something
    assert_grads_equal(grads_of(model, out_w.loss_sum), ref_w_grads)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_learnable_token_gives_zero_everywhere(family, fused):
    model = moe_model(family, fused)
    for weights in (False, True):
        batch = make_batch(weights=weights, learnable=False)
        for reduction in ("sum", "none"):
            out = model(batch, reduction=reduction)
            assert float(out.loss_sum.detach()) == 0.0 and int(out.n_tokens) == 0 and int(out.n_correct) == 0
            if reduction == "none":
                assert (out.token_losses == 0).all() and (out.sample_losses == 0).all()
                assert (out.sample_tokens == 0).all() and out.sample_losses.shape == (len(OFFSETS) - 1,)
                loss = objective(out)
            else:
                loss = out.loss_sum
            grads = grads_of(model, loss)
            assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads.values()), (weights, reduction)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_are_the_samples_without_cu_seqlens(family):
    model = moe_model(family, fused=True)
    packed = make_batch()
    rows = Batch.from_windows(packed.input_ids, packed.labels)
    out = model(rows, reduction="none")
    assert out.sample_losses.shape == out.sample_tokens.shape == (B,)
    torch.testing.assert_close(out.sample_losses, out.token_losses.sum(1), atol=ATOL, rtol=SUM_RTOL)
    assert torch.equal(out.sample_tokens, (rows.labels != IGNORE_INDEX).sum(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_trunk_is_what_the_head_attaches_to(family):
    model = moe_model(family, fused=True)
    batch = make_batch()
    args = (batch.input_ids, None, batch.position_ids)
    with torch.no_grad():
        trunk = model(batch, return_hidden=True)
        direct = model.trunk(batch.input_ids, batch.position_ids, cu_seqlens=batch.cu_seqlens)
        logits = model(*args, cu_seqlens=batch.cu_seqlens)  # (B, T, V)
        loss = model(batch)
    assert isinstance(trunk, Trunk) and trunk.hidden.shape == (B, T, model.config.dim)
    assert torch.equal(trunk.hidden, direct.hidden)
    head = model.output(trunk.hidden)  # (B, T, V)
    c = model.config
    if family == "gemma2":
        head = c.final_softcap * torch.tanh(head / c.final_softcap)
    if family == "granite_moe":
        head = head / c.logits_scaling
    torch.testing.assert_close(head, logits, atol=0, rtol=0)
    if family in ("gpt_oss", "granite_moe"):
        assert float(trunk.aux_loss) > 0 and torch.equal(trunk.aux_loss, loss.aux_loss)
    else:
        assert trunk.aux_loss == 0.0 and loss.aux_loss == 0.0


def test_forward_argument_errors():
    model = moe_model("llama", fused=True)
    batch = make_batch()
    with pytest.raises(ValueError, match="a Batch carries its own labels"):
        model(batch, batch.labels)
    with pytest.raises(ValueError, match="reduction='none' is a loss option; it needs labels"):
        model(batch.input_ids, reduction="none")
    with pytest.raises(ValueError, match="reduction 'mean' unknown"):
        model(batch, reduction="mean")
