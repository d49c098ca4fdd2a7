"""Scaled dot-product attention behind one function, with two backends.

    attention(q, k, v) = softmax(q @ k^T * scale + causal_mask) @ v,   scale = 1 / sqrt(head_dim) by default

q is (B, n_heads, T, head_dim); k and v are (B, n_kv_heads, T, head_dim) with n_heads a multiple of n_kv_heads
(grouped-query attention, Ainslie et al. 2023: query head h reads kv head h // (n_heads // n_kv_heads)).

Masking is either `causal=True` (query i sees keys <= i, aligned bottom-right when there are more keys than
queries, as with a KV cache) or an explicit boolean `mask` broadcastable to (B, n_heads, Tq, Tk), True where a
query may attend a key (padding and cached decoding build one: see causal_padding_mask).

Backends:
    "eager": the explicit reference. Everything in fp32 (scores, softmax, weighted sum), kv heads repeated;
             the output is cast back to q.dtype. Slow and memory hungry (materialises (B, H, T, T)); it exists
             to be read and to test the others against.
    "sdpa":  torch.nn.functional.scaled_dot_product_attention, which picks a fused kernel (flash, memory
             efficient, cuDNN, or the CPU flash kernel). GQA is passed as enable_gqa=True (torch >= 2.5) so
             kv heads are not copied.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("eager", "sdpa")


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B, H, T, D) and k, v (B, H_kv, T, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on batch or head_dim, or "
                         "n_heads is not a multiple of n_kv_heads")


def causal_padding_mask(q_start: int, q_len: int, key_valid: Tensor | None, device: torch.device) -> Tensor:
    """Boolean mask (B or 1, 1, q_len, q_start + q_len): query at absolute position q_start + i may attend key j
    when j <= q_start + i and key j is a real token (key_valid (B, >= Tk), 1 = token, 0 = padding).

    A query that is itself padding would then see no key at all and its softmax would be 0/0; it is allowed to
    attend itself, so every row stays finite (its output is never used).
    """
    k_len = q_start + q_len
    q_pos = torch.arange(q_start, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, Tq, Tk)
    if key_valid is not None:
        valid = key_valid[:, None, None, :k_len].bool()  # (B, 1, 1, Tk)
        allowed = (allowed & valid) | (k_pos == q_pos)  # (B, 1, Tq, Tk)
    return allowed


def eager_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
                    mask: Tensor | None = None) -> Tensor:
    """Reference attention in fp32. q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> (B, H, Tq, D) in q.dtype."""
    n_rep = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q32 = q.float()  # (B, H, Tq, D)
    k32 = k.float().repeat_interleave(n_rep, dim=1)  # (B, H, Tk, D)
    v32 = v.float().repeat_interleave(n_rep, dim=1)  # (B, H, Tk, D)
    scores = torch.einsum("bhqd,bhkd->bhqk", q32, k32) * scale  # (B, H, Tq, Tk)
    if causal:
        t_q, t_k = q.shape[2], k.shape[2]
        # query i sits at absolute position i + (Tk - Tq) and sees keys at positions <= its own
        allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)  # (Tq, Tk)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v32)  # (B, H, Tq, D)
    return out.to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
                   mask: Tensor | None = None) -> Tensor:
    """F.scaled_dot_product_attention. q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> (B, H, Tq, D)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        if causal:
            raise ValueError("sdpa backend: pass either causal=True or an explicit mask, not both")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if causal and q.shape[2] != k.shape[2]:
        # sdpa's is_causal aligns the mask to the top-left corner; the eager reference aligns it bottom-right
        raise ValueError("sdpa backend: causal attention needs as many queries as keys (build a mask)")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, backend: str = "sdpa",
              scale: float | None = None, mask: Tensor | None = None) -> Tensor:
    """Attention of q (B, n_heads, Tq, head_dim) over k, v (B, n_kv_heads, Tk, head_dim) -> (B, n_heads, Tq, head_dim).

    mask (optional): boolean, broadcastable to (B, n_heads, Tq, Tk), True = may attend; used instead of causal.
    """
    _check_shapes(q, k, v)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, causal=causal and mask is None, scale=scale, mask=mask)
    if backend == "eager":
        return eager_attention(q, k, v, causal=causal and mask is None, scale=scale, mask=mask)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
