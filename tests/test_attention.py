"""model/attention.py: the eager reference against a float64 loop, and sdpa against eager (outputs and q/k/v grads).

Tolerances:
- fp32: sdpa vs eager, atol 1e-5 and rtol 1e-5, elementwise, for the output and the gradients of q, k, v.
- bf16: inputs rounded to bf16; the reference is eager in fp32 on those same rounded inputs (so input rounding is
  not counted as error). Error is max |x - ref| / max |ref| per tensor: output <= 1e-2 (bf16 output rounding is
  2^-9 ~ 2e-3 relative; measured <= 4e-3), gradients <= 2.5e-2 (sdpa's CPU kernel accumulates in bf16; measured
  <= 1.3e-2 at T=128).
"""

import math

import pytest
import torch

from model.attention import attention

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


def run(q, k, v, grad_out, **kwargs):
    """Output and (dq, dk, dv) of attention on leaf copies of q, k, v."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves, **kwargs)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


def naive_attention(q, k, v, causal, scale):
    """A float64 loop over batch, head and query: the definition, for checking the eager backend itself."""
    b, h, t, d = q.shape
    rep = h // k.shape[1]
    out = torch.zeros(b, h, t, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // rep  # query head hi reads kv head hi // (n_heads / n_kv_heads)
            for i in range(t):
                n_keys = i + 1 if causal else t
                s = [(q[bi, hi, i].double() @ k[bi, kv, j].double()).item() * scale for j in range(n_keys)]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                for j in range(n_keys):
                    out[bi, hi, i] += w[j] / sum(w) * v[bi, kv, j].double()
    return out


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


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (x.float() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_against_fp32_reference(shape, backend):
    q, k, v, grad_out = make_inputs(shape, torch.bfloat16)
    out, grads = run(q, k, v, grad_out, backend=backend)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    ref_out, ref_grads = run(*(x.float() for x in (q, k, v, grad_out)), backend="eager")
    assert rel_err(out, ref_out) <= 1e-2
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert rel_err(g, ref) <= 2.5e-2, f"d{name}"


def test_custom_scale_sdpa_matches_eager():
    q, k, v, _ = make_inputs((2, 4, 2, 9, 16))
    torch.testing.assert_close(attention(q, k, v, backend="sdpa", scale=0.05),
                               attention(q, k, v, backend="eager", scale=0.05), atol=1e-5, rtol=1e-5)


def test_bad_backend_and_shapes_raise():
    q, k, v, _ = make_inputs((1, 4, 2, 3, 8))
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="flash9")
    with pytest.raises(ValueError, match="multiple"):
        attention(q[:, :3], k, v)  # 3 query heads over 2 kv heads
    with pytest.raises(ValueError):
        attention(q, k[..., :4], v[..., :4])  # head_dim differs
    with pytest.raises(ValueError, match="causal"):
        attention(q[:, :, :2], k, v, backend="sdpa")  # sdpa would align the causal mask differently
