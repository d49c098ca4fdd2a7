"""model/attention.py: eager against the definition (float64), every other backend against eager.

The definition is written twice in float64: a Python loop over (batch, head, query, key) that states every rule
literally (`naive_attention`), and a vectorised copy with an explicit (B, H, Tq, Tk) mask built from the same
rule (`reference_attention`) whose autograd gives the reference gradients. The loop checks the vectorised copy
(1e-12) and eager's forward; the vectorised copy checks eager's gradients of q, k, v and the sinks.

Tolerances:
- eager (fp32 inside) vs the float64 definition: atol 1e-6, rtol 1e-6 for outputs; atol 1e-5, rtol 1e-5 for the
  gradients of q, k, v and sinks (measured <= 2e-7 and <= 6e-7).
- fp32: sdpa vs eager, atol 1e-5 and rtol 1e-5, elementwise, for the output and the gradients of q, k, v. Packed
  documents vs each document alone: eager atol 1e-6, sdpa atol 1e-5 (both rtol as atol). Measured on the packed
  GQA cases: <= 1.4e-6 (fp32); bf16 output 2.6e-3, gradients 5.4e-3.
- bf16: inputs rounded to bf16; the reference is eager in fp32 on those same rounded inputs (so input rounding is
  not counted as error). Error is max |x - ref| / max |ref| per tensor: output <= 1e-2 (bf16 output rounding is
  2^-9 ~ 2e-3 relative; measured <= 4e-3), gradients <= 2.5e-2 (sdpa's CPU kernel accumulates in bf16; measured
  <= 1.3e-2 at T=128). The same bounds hold flex and flash (CUDA) in bf16, sinks' gradient included.
- flex fp32 (CUDA) vs eager fp32: outputs atol 2e-5, rtol 2e-5; gradients atol 5e-5, rtol 2e-5. Eager itself is
  within 1.9e-6 (outputs) and 4.4e-6 (gradients, magnitudes up to ~11) of float64 at the CUDA test shape
  (measured on CPU), so these leave about 10x for flex's own fp32 rounding (TF32 is off by default).
- flex fp32 forward on CPU vs eager: atol 1e-5, rtol 1e-5 (measured 1.5e-6).

flex and flash run only on CUDA (FlexAttention has no backward on CPU; flash-attn does not install without CUDA);
those tests skip elsewhere and say so. A single CPU test compiles flex's forward once (about 20 s on 2 cores).
"""

import itertools
import math

import pytest
import torch

import model.attention as attn
from model.attention import attention, resolve_backend

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="flex/flash attention need a CUDA GPU (FlexAttention has no backward on CPU; flash-attn does not "
           "install without CUDA)")

# (B, n_heads, n_kv_heads, T, head_dim): single token, odd lengths, MHA, GQA 4:1 (MQA here) and 6:2
SHAPES = [
    (1, 1, 1, 1, 8),
    (2, 4, 1, 1, 16),
    (2, 4, 4, 7, 16),
    (2, 4, 1, 7, 8),
    (1, 6, 2, 7, 16),
    (2, 8, 2, 33, 16),
    (1, 4, 1, 128, 8),
]


def make_inputs(shape, dtype=torch.float32, seed=0):
    b, h, h_kv, t, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g)  # (B, H, T, D)
    k = torch.randn(b, h_kv, t, d, generator=g)  # (B, H_kv, T, D)
    v = torch.randn(b, h_kv, t, d, generator=g)  # (B, H_kv, T, D)
    grad_out = torch.randn(b, h, t, d, generator=g)  # (B, H, T, D)
    return [x.to(dtype) for x in (q, k, v, grad_out)]


def run(q, k, v, grad_out, fn=attention, **kwargs):
    """Output and the gradients of q, k, v (and sinks, when given) of fn on leaf copies of the inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    if kwargs.get("sinks") is not None:
        kwargs["sinks"] = kwargs["sinks"].detach().clone().requires_grad_()
        leaves.append(kwargs["sinks"])
    out = fn(*leaves[:3], **kwargs)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (x.float() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_bf16_close(out, grads, ref_out, ref_grads, names="qkv"):
    """The bf16 bounds of the module docstring: output <= 1e-2, every gradient <= 2.5e-2 relative to max |ref|."""
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert rel_err(out, ref_out) <= 1e-2, f"output: {rel_err(out, ref_out):.2e}"
    for name, g, ref in zip(names, grads, ref_grads):
        assert rel_err(g, ref) <= 2.5e-2, f"d{name}: {rel_err(g, ref):.2e}"


# ----------------------------------------------------------------------------- the definition, in float64


def doc_of(cu_seqlens, flat_index):
    """Index of the packed document holding token `flat_index` of the flattened (B * T) batch."""
    return next(d for d in range(len(cu_seqlens) - 1) if cu_seqlens[d] <= flat_index < cu_seqlens[d + 1])


def may_attend(b, h, i, j, t_q, t_k, causal, window, cu_seqlens, mask):
    """The rule: query i of row b, head h, at absolute index a = i + Tk - Tq, may attend key j of row b."""
    a = i + t_k - t_q
    if causal and j > a:
        return False
    if window and a - j >= window:
        return False
    if cu_seqlens is not None and doc_of(cu_seqlens, b * t_k + a) != doc_of(cu_seqlens, b * t_k + j):
        return False
    if mask is not None and not mask[b % mask.shape[0], h % mask.shape[1], i, j]:
        return False
    return True


def naive_attention(q, k, v, causal=True, scale=None, window=0, softcap=0.0, sinks=None, cu_seqlens=None,
                    mask=None):
    """A float64 loop over batch, head, query and allowed key: the definition, for checking everything else."""
    b, h, t_q, d = q.shape
    t_k = k.shape[2]
    rep = h // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    cu = None if cu_seqlens is None else cu_seqlens.tolist()
    out = torch.zeros(b, h, t_q, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // rep  # query head hi reads kv head hi // (n_heads / n_kv_heads)
            for i in range(t_q):
                keys = [j for j in range(t_k) if may_attend(bi, hi, i, j, t_q, t_k, causal, window, cu, mask)]
                s = []
                for j in keys:
                    x = (q[bi, hi, i].double() @ k[bi, kv, j].double()).item() * scale
                    s.append(softcap * math.tanh(x / softcap) if softcap else x)
                sink = [] if sinks is None else [sinks[hi].item()]  # a logit in the denominator only
                m = max(s + sink)
                z = sum(math.exp(x - m) for x in s + sink)
                for x, j in zip(s, keys):
                    out[bi, hi, i] += math.exp(x - m) / z * v[bi, kv, j].double()
    return out


def reference_attention(q, k, v, causal=True, scale=None, window=0, softcap=0.0, sinks=None, cu_seqlens=None,
                        mask=None):
    """The same definition vectorised in float64 (differentiable): an explicit mask from `may_attend`, kv heads
    gathered per query head, and the sink as an extra logit of the log-sum-exp."""
    b, h, t_q, d = q.shape
    t_k = k.shape[2]
    rep = h // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    cu = None if cu_seqlens is None else cu_seqlens.tolist()
    kv_head = [hi // rep for hi in range(h)]
    k64, v64 = k.double()[:, kv_head], v.double()[:, kv_head]  # (B, H, Tk, D)
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k64) * scale  # (B, H, Tq, Tk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = torch.tensor([[[[may_attend(bi, hi, i, j, t_q, t_k, causal, window, cu, mask) for j in range(t_k)]
                              for i in range(t_q)] for hi in range(h)] for bi in range(b)])  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    logits = scores
    if sinks is not None:
        sink = sinks.double()[None, :, None, None].expand(b, h, t_q, 1)  # (B, H, Tq, 1)
        logits = torch.cat([scores, sink], dim=-1)  # (B, H, Tq, Tk + 1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, H, Tq, 1)
    return torch.einsum("bhij,bhjd->bhid", torch.exp(scores - lse), v64)  # (B, H, Tq, D)


# ----------------------------------------------------------------------------- small packed GQA cases (CPU)

B, H, H_KV, T, D = 2, 6, 2, 13, 8
T_NEW = 5  # a KV-cache step: 5 new queries at absolute positions 8..12 over 13 keys
CU = [0, 5, 17, 20, 26]  # documents of 5, 12 (crossing the row boundary at 13: rows stay separate), 3 and 6 tokens
SEGMENTS = [(0, 0, 5), (0, 5, 13), (1, 0, 4), (1, 4, 7), (1, 7, 13)]  # (row, start, end) of each piece of CU
WINDOW = 4
SOFTCAP = 1.5  # scores here are ~N(0, 1) (randn q, k at scale 1/sqrt(8)): a cap of 1.5 bends most of them


def make_sinks(heads=H, seed=1):
    """(heads,) logits of the order of a log-sum-exp over a few keys, so the sink takes a real share."""
    return torch.randn(heads, generator=torch.Generator().manual_seed(seed)) + 1.0


def make_mask(batch, heads, t_q, t_k, seed=2):
    """Random boolean (batch, heads, Tq, Tk), about 30% False; each query keeps its own position, so no row is
    empty (a row with no key is 0/0 in eager and sdpa alike)."""
    keep = torch.rand(batch, heads, t_q, t_k, generator=torch.Generator().manual_seed(seed)) > 0.3
    own = torch.arange(t_k - t_q, t_k)[:, None] == torch.arange(t_k)[None, :]  # (Tq, Tk)
    return keep | own


def packed_case(t_q=T, dtype=torch.float32, seed=0, window=0, softcap=0.0, sinks=False, documents=False,
                mask=None, **rest):
    """q (B, H, t_q, D), k, v (B, H_KV, T, D), grad_out, and the attention kwargs of one feature combination.
    mask: None or the (batch, heads) of a random mask."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, t_q, D, generator=g).to(dtype)  # (B, H, Tq, D)
    k = torch.randn(B, H_KV, T, D, generator=g).to(dtype)  # (B, H_kv, Tk, D)
    v = torch.randn(B, H_KV, T, D, generator=g).to(dtype)  # (B, H_kv, Tk, D)
    grad_out = torch.randn(B, H, t_q, D, generator=g).to(dtype)  # (B, H, Tq, D)
    kwargs = dict(window=window, softcap=softcap, **rest)
    kwargs["sinks"] = make_sinks().to(dtype) if sinks else None
    kwargs["cu_seqlens"] = torch.tensor(CU, dtype=torch.int32) if documents else None
    kwargs["mask"] = make_mask(*mask, t_q, T) if mask else None
    return q, k, v, grad_out, kwargs


FEATURE_CASES = {
    "plain": dict(),
    "bidirectional": dict(causal=False),
    "window": dict(window=WINDOW),
    "window_bidirectional": dict(window=WINDOW, causal=False),
    "softcap": dict(softcap=SOFTCAP),
    "sinks": dict(sinks=True),
    "documents": dict(documents=True),
    "mask_per_head": dict(mask=(1, H)),
    "kv_cache": dict(t_q=T_NEW),
    "all": dict(window=WINDOW, softcap=SOFTCAP, sinks=True, documents=True, mask=(B, 1), scale=0.3),
    "all_kv_cache": dict(t_q=T_NEW, window=WINDOW, softcap=SOFTCAP, sinks=True, mask=(B, 1)),
}


# ----------------------------------------------------------------------------- eager against the definition


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 8), (2, 4, 1, 5, 8), (1, 6, 2, 7, 4)])
def test_eager_matches_definition(shape, causal):
    q, k, v, _ = make_inputs(shape)
    scale = 0.3
    out = attention(q, k, v, causal=causal, backend="eager", scale=scale)
    expected = naive_attention(q, k, v, causal, scale)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)
    default_scale = attention(q, k, v, causal=causal, backend="eager")
    torch.testing.assert_close(default_scale.double(), naive_attention(q, k, v, causal, shape[-1] ** -0.5),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", FEATURE_CASES)
def test_eager_features_match_definition(case):
    q, k, v, _, kwargs = packed_case(**FEATURE_CASES[case])
    expected = naive_attention(q, k, v, **kwargs)
    torch.testing.assert_close(reference_attention(q, k, v, **kwargs), expected, atol=1e-12, rtol=1e-12)
    out = attention(q, k, v, backend="eager", **kwargs)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)


def test_definition_features_change_the_output():
    """Each feature of the packed cases moves the output (so the cases above test something)."""
    q, k, v, _, plain = packed_case()
    base = naive_attention(q, k, v, **plain)
    for case in ("window", "softcap", "sinks", "documents", "mask_per_head"):
        *_, kwargs = packed_case(**FEATURE_CASES[case])
        assert (naive_attention(q, k, v, **kwargs) - base).abs().max() > 1e-2, case


@pytest.mark.parametrize("case", ["sinks", "all", "all_kv_cache"])
def test_eager_gradients_match_definition(case):
    """Eager's fp32 gradients of q, k, v and the sinks against autograd through the float64 definition."""
    q, k, v, grad_out, kwargs = packed_case(**FEATURE_CASES[case])
    out, grads = run(q, k, v, grad_out, backend="eager", **kwargs)
    ref_out, ref_grads = run(*(x.double() for x in (q, k, v, grad_out)), fn=reference_attention,
                             **{n: x.double() if n == "sinks" else x for n, x in kwargs.items()})
    torch.testing.assert_close(out.double(), ref_out, atol=1e-6, rtol=1e-6)
    assert len(grads) == len(ref_grads) == 4
    for name, g, ref in zip(["q", "k", "v", "sinks"], grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_reference_gradients_pass_gradcheck():
    """The float64 definition's autograd (through the -inf mask, softcap and the sink) against finite differences,
    so the gradients eager is held to are right."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)  # (B, H, T, D)
    k = torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)  # (B, H_kv, T, D)
    v = torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)  # (H,)
    cu = torch.tensor([0, 1, 4])

    def fn(q, k, v, sinks):
        return reference_attention(q, k, v, window=2, softcap=1.0, sinks=sinks, cu_seqlens=cu)

    assert torch.autograd.gradcheck(fn, (q, k, v, sinks), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- sdpa against eager


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_matches_eager_fp32(shape, causal):
    q, k, v, grad_out = make_inputs(shape)
    out, grads = run(q, k, v, grad_out, causal=causal, backend="sdpa")
    ref_out, ref_grads = run(q, k, v, grad_out, causal=causal, backend="eager")
    assert out.shape == ref_out.shape == q.shape
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, g, ref in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_against_fp32_reference(shape, backend):
    q, k, v, grad_out = make_inputs(shape, torch.bfloat16)
    out, grads = run(q, k, v, grad_out, backend=backend)
    ref_out, ref_grads = run(*(x.float() for x in (q, k, v, grad_out)), backend="eager")
    assert_bf16_close(out, grads, ref_out, ref_grads)


# Every combination sdpa serves: window x documents x explicit mask x (Tq == Tk, or Tq < Tk: a KV cache).
# Documents with a KV cache are refused (see test_argument_errors), so those four are not here.
SDPA_COMBOS = [(w, docs, m, t_q) for w, docs, m, t_q in itertools.product([0, WINDOW], [False, True], [False, True],
                                                                           [T, T_NEW]) if not (docs and t_q != T)]


def combo_id(combo):
    w, docs, m, t_q = combo
    return "-".join([f"window{w}", "docs" if docs else "nodocs", "mask" if m else "nomask",
                     "prefill" if t_q == T else "kv_cache"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("combo", SDPA_COMBOS, ids=combo_id)
def test_sdpa_matches_eager_packed(combo, dtype):
    window, documents, mask, t_q = combo
    q, k, v, grad_out, kwargs = packed_case(t_q=t_q, dtype=dtype, window=window, documents=documents,
                                            mask=(B, 1) if mask else None)
    out, grads = run(q, k, v, grad_out, backend="sdpa", **kwargs)
    ref_out, ref_grads = run(*(x.float() for x in (q, k, v, grad_out)), backend="eager", **kwargs)
    assert out.shape == q.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        for name, g, ref in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
    else:
        assert_bf16_close(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_kv_cache_matches_eager_and_full_attention(causal):
    """Queries at the end of a longer key sequence (Tq < Tk): sdpa equals eager, and both equal the last rows of
    attention over the whole sequence (query i sits at absolute index i + Tk - Tq)."""
    q, k, v, _ = make_inputs((2, 4, 2, 9, 16))
    full = attention(q, k, v, backend="eager", causal=causal)
    for t_q in (1, 2, 5):
        step_q = q[:, :, -t_q:]  # (B, H, t_q, D)
        eager = attention(step_q, k, v, backend="eager", causal=causal)
        torch.testing.assert_close(attention(step_q, k, v, backend="sdpa", causal=causal), eager,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eager, full[:, :, -t_q:], atol=1e-6, rtol=1e-6)


def test_custom_scale_sdpa_matches_eager():
    q, k, v, _ = make_inputs((2, 4, 2, 9, 16))
    torch.testing.assert_close(attention(q, k, v, backend="sdpa", scale=0.05),
                               attention(q, k, v, backend="eager", scale=0.05), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend, features", [
    ("eager", dict(window=WINDOW, softcap=SOFTCAP, sinks=True)),
    ("sdpa", dict(window=WINDOW)),
], ids=["eager", "sdpa"])
def test_packed_equals_separate(backend, features):
    """A packed batch with cu_seqlens gives every document what it gets alone (rows split CU's second document)."""
    q, k, v, _, kwargs = packed_case(documents=True, **features)
    packed = attention(q, k, v, backend=backend, **kwargs)
    kwargs.pop("cu_seqlens")
    tol = 1e-6 if backend == "eager" else 1e-5
    assert sum(end - start for _, start, end in SEGMENTS) == B * T
    for row, start, end in SEGMENTS:
        piece = [x[row:row + 1, :, start:end] for x in (q, k, v)]  # (1, heads, length, D)
        alone = attention(*piece, backend=backend, **kwargs)
        torch.testing.assert_close(packed[row:row + 1, :, start:end], alone, atol=tol, rtol=tol,
                                   msg=lambda m: f"row {row} [{start}:{end}]: {m}")


# ----------------------------------------------------------------------------- errors and backend choice


def test_bad_backend_and_shapes_raise():
    q, k, v, _ = make_inputs((1, 4, 2, 3, 8))
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="flash9")
    with pytest.raises(ValueError, match="multiple"):
        attention(q[:, :3], k, v)  # 3 query heads over 2 kv heads
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, k[..., :4], v[..., :4])  # head_dim differs
    with pytest.raises(ValueError, match="expected q"):
        attention(q, k, v[:, :, :2])  # k and v disagree


@pytest.mark.parametrize("feature, kwargs", [("softcap", dict(softcap=SOFTCAP)), ("sinks", dict(sinks=True))])
def test_sdpa_refuses_softcap_and_sinks_naming_who_can(feature, kwargs):
    q, k, v, _, kw = packed_case(**kwargs)
    with pytest.raises(ValueError, match=f"'sdpa' does not support {feature}") as err:
        attention(q, k, v, backend="sdpa", **kw)
    able = err.value.args[0].split("backends that do:")[1]
    assert "eager" in able and "flex" in able and "sdpa" not in able, able


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_cuda_backends_refused_on_cpu(backend):
    q, k, v, _ = make_inputs((1, 4, 2, 8, 16), torch.bfloat16)  # bf16: flash's only objection is then the device
    with pytest.raises(ValueError, match=f"'{backend}' is not available on cpu"):
        attention(q, k, v, backend=backend)


def test_flash_refuses_fp32_and_auto_on_cuda_skips_it(monkeypatch):
    """flash kernels take fp16/bf16 only. The CUDA preference (flash, flex, sdpa, eager) is checked without a GPU:
    resolve_backend only looks at what is installed."""
    monkeypatch.setattr(attn, "_announced", set())
    q, k, v, _ = make_inputs((1, 4, 2, 8, 16))
    with pytest.raises(ValueError, match="'flash' does not support fp32") as err:
        attention(q, k, v, backend="flash")
    assert "flash" not in err.value.args[0].split("backends that do:")[1]
    cuda = torch.device("cuda")
    flash = attn.available("flash", cuda)  # flash-attn, or torch's varlen_attn, is installed
    assert resolve_backend("auto", frozenset({"documents"}), cuda) == ("flash" if flash else "flex")
    assert resolve_backend("auto", frozenset({"documents", "fp32"}), cuda) == "flex"
    assert resolve_backend("auto", frozenset({"sinks", "window", "fp32"}), cuda) == "flex"
    assert resolve_backend("auto", frozenset({"kv_cache"}), cuda) == "sdpa"  # flex would recompile per decode step
    assert resolve_backend("auto", frozenset({"kv_cache", "sinks"}), cuda) == "eager"
    assert resolve_backend("auto", frozenset({"mask", "kv_cache", "fp32"}), cuda) == "sdpa"
    assert resolve_backend("auto", frozenset({"mask", "softcap"}), cuda) == "eager"


def test_argument_errors():
    q, k, v, _, kwargs = packed_case()
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, backend="eager", window=-1)
    with pytest.raises(ValueError, match="softcap"):
        attention(q, k, v, backend="eager", softcap=-1.0)
    for bad in (torch.zeros(H + 1), torch.zeros(1, H), torch.zeros(H_KV)):
        with pytest.raises(ValueError, match=rf"sinks must have one logit per query head, shape \({H},\)"):
            attention(q, k, v, backend="eager", sinks=bad)
    for bad in ([1, 5, 26], [0, 5, 25], [0, 5, 27]):  # not from 0, short of B * T = 26, past it
        with pytest.raises(ValueError, match="cu_seqlens must be 1-D offsets from 0 to B \\* T = 26"):
            attention(q, k, v, backend="eager", cu_seqlens=torch.tensor(bad, dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        attention(q, k, v, backend="eager", cu_seqlens=torch.tensor([[0, 13], [13, 26]], dtype=torch.int32))
    cu = torch.tensor(CU, dtype=torch.int32)
    for backend in ("eager", "sdpa"):
        with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
            attention(q[:, :, -T_NEW:], k, v, backend=backend, cu_seqlens=cu)


def test_auto_on_cpu_prefers_sdpa_then_eager_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(attn, "_announced", set())
    sdpa_needs = frozenset({"window", "documents", "mask", "kv_cache"})
    assert resolve_backend("auto", frozenset(), CPU) == "sdpa"
    assert resolve_backend("auto", sdpa_needs, CPU) == "sdpa"
    assert resolve_backend("auto", frozenset({"softcap"}), CPU) == "eager"
    assert resolve_backend("auto", frozenset({"sinks", "window"}), CPU) == "eager"
    assert capsys.readouterr().out.splitlines() == [
        "attention: auto -> sdpa on cpu (needs: causal only)",
        "attention: auto -> sdpa on cpu (needs: documents, kv_cache, mask, window)",
        "attention: auto -> eager on cpu (needs: softcap)",
        "attention: auto -> eager on cpu (needs: sinks, window)",
    ]
    for _ in range(3):  # the same needs again: chosen the same way, printed no more
        assert resolve_backend("auto", frozenset(), CPU) == "sdpa"
        assert resolve_backend("auto", frozenset({"softcap"}), CPU) == "eager"
    assert capsys.readouterr().out == ""

    # through attention(): auto's result is the chosen backend's result
    q, k, v, _, kwargs = packed_case(window=WINDOW, softcap=SOFTCAP, sinks=True, documents=True)
    torch.testing.assert_close(attention(q, k, v, backend="auto", **kwargs),
                               attention(q, k, v, backend="eager", **kwargs), atol=0, rtol=0)
    assert capsys.readouterr().out == "attention: auto -> eager on cpu (needs: documents, fp32, sinks, softcap, window)\n"


# ----------------------------------------------------------------------------- flex and flash (CUDA)

# Shapes flex likes (T a multiple of its 128 blocks, head_dim 64); documents of odd lengths that do not line up
# with blocks, one (200..317) crossing the row boundary at 256.
GB, GH, GH_KV, GT, GD = 2, 6, 2, 256, 64
GPU_CU = [0, 37, 128, 200, 317, 406, 512]
GPU_WINDOW = 48
GPU_SOFTCAP = 5.0  # q is drawn with std 2, so scores are ~N(0, 4) and the cap bends the large ones


def gpu_case(device, dtype=torch.float32, t_q=GT, window=0, softcap=0.0, sinks=False, documents=False, seed=0):
    """q (GB, GH, t_q, GD), k, v (GB, GH_KV, GT, GD), grad_out and the kwargs, made on CPU then moved."""
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(GB, GH, t_q, GD, generator=g)  # (B, H, Tq, D)
    k = torch.randn(GB, GH_KV, GT, GD, generator=g)  # (B, H_kv, Tk, D)
    v = torch.randn(GB, GH_KV, GT, GD, generator=g)  # (B, H_kv, Tk, D)
    grad_out = torch.randn(GB, GH, t_q, GD, generator=g)  # (B, H, Tq, D)
    kwargs = dict(window=window, softcap=softcap,
                  sinks=(torch.randn(GH, generator=g) + 2.0).to(device, dtype) if sinks else None,
                  cu_seqlens=torch.tensor(GPU_CU, dtype=torch.int32, device=device) if documents else None)
    return [x.to(device, dtype) for x in (q, k, v, grad_out)] + [kwargs]


def fp32_kwargs(kwargs):
    return {n: x.float() if n == "sinks" and x is not None else x for n, x in kwargs.items()}


@pytest.fixture
def fresh_dynamo():
    """Every flex combination is its own compiled graph. Past dynamo's recompile limit (8 per function)
    torch.compile would quietly run flex_attention uncompiled (dense math, not the kernel under test), so each
    test starts from an empty compile cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sinks", [False, True], ids=["nosinks", "sinks"])
@pytest.mark.parametrize("softcap", [0.0, GPU_SOFTCAP], ids=["nocap", "softcap"])
@pytest.mark.parametrize("documents", [False, True], ids=["nodocs", "docs"])
@pytest.mark.parametrize("window", [0, GPU_WINDOW], ids=["full", "window"])
def test_flex_matches_eager_cuda(window, documents, softcap, sinks, dtype, fresh_dynamo):
    q, k, v, grad_out, kwargs = gpu_case("cuda", dtype, window=window, softcap=softcap, sinks=sinks,
                                         documents=documents)
    out, grads = run(q, k, v, grad_out, backend="flex", **kwargs)
    ref_out, ref_grads = run(*(x.float() for x in (q, k, v, grad_out)), backend="eager", **fp32_kwargs(kwargs))
    names = ["q", "k", "v", "sinks"]
    assert out.shape == q.shape and len(grads) == len(ref_grads) == (4 if sinks else 3)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
        for name, g, ref in zip(names, grads, ref_grads):
            torch.testing.assert_close(g, ref, atol=5e-5, rtol=2e-5, msg=lambda m: f"d{name}: {m}")
    else:
        assert_bf16_close(out, grads, ref_out, ref_grads, names)


def test_flex_refuses_a_kv_cache():
    """Decoding through flex would compile a kernel per cache length; it is refused and auto decodes elsewhere."""
    q, k, v, _ = make_inputs((1, 4, 2, 8, 16))
    with pytest.raises(ValueError, match="'flex' does not support kv_cache"):
        attention(q[:, :, :2], k, v, backend="flex", sinks=torch.zeros(4))


@needs_cuda
@pytest.mark.parametrize("softcap", [0.0, GPU_SOFTCAP], ids=["nocap", "softcap"])
@pytest.mark.parametrize("documents", [False, True], ids=["nodocs", "docs"])
@pytest.mark.parametrize("window", [0, GPU_WINDOW], ids=["full", "window"])
def test_flash_matches_eager_cuda(window, documents, softcap):
    """bf16 only: flash-attn and varlen_attn take fp16/bf16."""
    cuda = torch.device("cuda")
    if not attn.available("flash", cuda):
        pytest.skip("flash backend: neither flash-attn nor torch.nn.attention.varlen.varlen_attn is installed")
    q, k, v, grad_out, kwargs = gpu_case("cuda", torch.bfloat16, window=window, softcap=softcap,
                                         documents=documents)
    needs = {"window"} if window else set()
    needs |= {"softcap"} if softcap else set()
    missing = needs - attn.backend_features("flash")
    if missing:  # the error is still checked, then the skip says why
        with pytest.raises(ValueError, match="'flash' does not support"):
            attention(q, k, v, backend="flash", **kwargs)
        pytest.skip(f"flash backend without flash-attn (PyTorch's varlen_attn) has no {', '.join(sorted(missing))}")
    out, grads = run(q, k, v, grad_out, backend="flash", **kwargs)
    ref_out, ref_grads = run(*(x.float() for x in (q, k, v, grad_out)), backend="eager", **kwargs)
    assert out.shape == q.shape
    assert_bf16_close(out, grads, ref_out, ref_grads)


def test_flex_forward_on_cpu_matches_eager(fresh_dynamo):
    """CPU FlexAttention, forward only (no backward and no log-sum-exp there, so no sinks): window, documents and
    softcap at once, in one compile (about 20 s on 2 cores). Called directly: attention() refuses flex on CPU."""
    q, k, v, _, kwargs = gpu_case("cpu", window=GPU_WINDOW, softcap=GPU_SOFTCAP, documents=True)
    with torch.no_grad():
        out = attn.flex_attention(q, k, v, window=GPU_WINDOW, softcap=GPU_SOFTCAP, cu_seqlens=kwargs["cu_seqlens"])
    ref = attention(q, k, v, backend="eager", **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
