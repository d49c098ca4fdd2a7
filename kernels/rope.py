"""Rotary position embeddings (Su et al., 2021, RoFormer) for q and k in one Triton launch.

Math, in the rotate-half layout of model/rope.py (Hugging Face checkpoints): a head vector x of size D is split
into halves (x1, x2) = (x[:D/2], x[D/2:]), and pair j = (x1[j], x2[j]) is rotated by its token's angle:

    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin

cos/sin are per-token tables (B or 1, T, D/2) from model.rope.rope_cos_sin, so the position ids (packed documents
restarting at 0) and every frequency scaling (linear, llama3, yarn, whose cos_sin_scale multiplies both) are
already in them: the kernel only rotates.

Gradient: the forward is y = M x with M = [[cos, -sin], [sin, cos]] per pair, so dx = M^T dy, the rotation by
the negative angle (for yarn, M is a scaled rotation and M^T is still what negating sin gives):

    dx1 = dy1 * cos + dy2 * sin
    dx2 = dy2 * cos - dy1 * sin

The backward is therefore the forward kernel with sin negated. cos and sin are not learned: no gradient.

Layout: one program per (token, block of heads). It loads the token's cos/sin row once and rotates its block of q
heads and its block of k heads (GQA: Hq and Hk need not divide each other; both are split into the same number
of blocks). Inputs are (B, T, H, D) with any strides on B, T, H and stride 1 on D (often views of a fused
projection); cos/sin take any strides (stride 0 on B broadcasts a batch-1 table). Outputs are new contiguous
(B, T, H, D) tensors in the input dtype. Math is fp32. D/2 is padded to a power of two and masked.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.rope_ref import apply_rope_ref

MAX_TILE = 2048  # most (heads x D/2) elements per half a program loads for q (and again for k)


@triton.jit
def _rotate_heads(x_ptr, stride_h, out_ptr, first_head, n_heads, half, cos, sin,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate heads [first_head, first_head + BLOCK_H) of one token; x_ptr and out_ptr point at its head 0."""
    h = first_head + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    j = tl.arange(0, BLOCK_HALF)  # (BLOCK_HALF,)
    mask = (h < n_heads)[:, None] & (j < half)[None, :]  # (BLOCK_H, BLOCK_HALF)
    x_offsets = h[:, None] * stride_h + j[None, :]  # (BLOCK_H, BLOCK_HALF) into the first half
    out_offsets = h[:, None] * (2 * half) + j[None, :]  # (BLOCK_H, BLOCK_HALF) contiguous output
    x1 = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_HALF)
    x2 = tl.load(x_ptr + x_offsets + half, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_HALF)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    tl.store(out_ptr + out_offsets, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_offsets + half, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
    q_stride_b, q_stride_t, q_stride_h,
    k_stride_b, k_stride_t, k_stride_h,
    cos_stride_b, cos_stride_t, cos_stride_j,
    sin_stride_b, sin_stride_t, sin_stride_j,
    T, n_q_heads, n_k_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, NEGATE_SIN: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # b * T + t
    head_block = tl.program_id(1)
    b = token // T
    t = token % T

    j = tl.arange(0, BLOCK_HALF)  # (BLOCK_HALF,)
    cos = tl.load(cos_ptr + b * cos_stride_b + t * cos_stride_t + j * cos_stride_j, mask=j < half, other=0.0)
    sin = tl.load(sin_ptr + b * sin_stride_b + t * sin_stride_t + j * sin_stride_j, mask=j < half, other=0.0)
    cos = cos.to(tl.float32)[None, :]  # (1, BLOCK_HALF)
    sin = sin.to(tl.float32)[None, :]  # (1, BLOCK_HALF)
    if NEGATE_SIN:  # backward: rotate by the negative angle (M^T)
        sin = -sin

    _rotate_heads(q_ptr + b * q_stride_b + t * q_stride_t, q_stride_h, q_out_ptr + token * n_q_heads * 2 * half,
                  head_block * BLOCK_HQ, n_q_heads, half, cos, sin, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + b * k_stride_b + t * k_stride_t, k_stride_h, k_out_ptr + token * n_k_heads * 2 * half,
                  head_block * BLOCK_HK, n_k_heads, half, cos, sin, BLOCK_HK, BLOCK_HALF)


def _check_inputs(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, T, heads, head_dim), got shapes {tuple(q.shape)} and "
                         f"{tuple(k.shape)}; view a (B, T, heads * head_dim) projection as (B, T, heads, head_dim)")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise ValueError(f"q and k must be floating point, got {q.dtype} and {k.dtype}; cast them to bf16, fp16 "
                         "or fp32")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}; cast one, e.g. "
                         "k.to(q.dtype)")
    if q.device != k.device or cos.device != q.device or sin.device != q.device:
        raise ValueError(f"q, k, cos and sin must be on the same device, got {q.device}, {k.device}, "
                         f"{cos.device} and {sin.device}; move them with .to(q.device)")
    (B, T, _, D), (Bk, Tk, _, Dk) = q.shape, k.shape
    if (B, T, D) != (Bk, Tk, Dk):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, sequence length and "
                         "head_dim (only the number of heads may differ)")
    if D == 0 or D % 2:
        raise ValueError(f"head_dim must be a positive even number (rotate-half pairs x[j] with x[j + D/2]), "
                         f"got {D}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}; "
                         "build both with model.rope.rope_cos_sin")
    if cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1:] != (T, D // 2):
        raise ValueError(f"cos/sin must have shape ({B} or 1, {T}, {D // 2}) = (B or 1, T, head_dim / 2) for q "
                         f"{tuple(q.shape)}, got {tuple(cos.shape)}; build them with model.rope.rope_cos_sin from "
                         "position_ids (B, T)")


def _out_buffer(out: Tensor | None, like: Tensor, name: str) -> Tensor:
    """`out` checked to be a contiguous tensor shaped, typed and placed like `like`, or a new one."""
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {like.dtype} tensor of shape {tuple(like.shape)} on "
                         f"{like.device}, got {out.dtype} {tuple(out.shape)} on {out.device} "
                         f"(contiguous: {out.is_contiguous()}); pass None to allocate it")
    return out


def _launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_out: Tensor | None, k_out: Tensor | None,
            negate_sin: bool, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    _check_inputs(q, k, cos, sin)
    q = q if q.stride(-1) == 1 else q.contiguous()  # (B, T, Hq, D)
    k = k if k.stride(-1) == 1 else k.contiguous()  # (B, T, Hk, D)
    q_out, k_out = _out_buffer(q_out, q, names[0]), _out_buffer(k_out, k, names[1])
    B, T, n_q_heads, D = q.shape
    n_k_heads, half = k.shape[2], D // 2
    if B * T == 0 or n_q_heads + n_k_heads == 0:
        return q_out, k_out

    block_half = triton.next_power_of_2(half)
    heads_per_block = max(1, MAX_TILE // block_half)  # a power of two
    n_head_blocks = triton.cdiv(max(n_q_heads, n_k_heads), heads_per_block)
    block_hq = triton.next_power_of_2(max(1, triton.cdiv(n_q_heads, n_head_blocks)))  # <= heads_per_block
    block_hk = triton.next_power_of_2(max(1, triton.cdiv(n_k_heads, n_head_blocks)))
    cos_stride_b = 0 if cos.shape[0] == 1 else cos.stride(0)  # batch-1 table broadcasts over B
    sin_stride_b = 0 if sin.shape[0] == 1 else sin.stride(0)
    _rope_kernel[(B * T, n_head_blocks)](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        cos_stride_b, cos.stride(1), cos.stride(2),
        sin_stride_b, sin.stride(1), sin.stride(2),
        T, n_q_heads, n_k_heads, half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, NEGATE_SIN=negate_sin,
    )
    return q_out, k_out


def rope_forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_out: Tensor | None = None,
                 k_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rotated (q, k), contiguous (B, T, Hq, D) and (B, T, Hk, D) in q's dtype, written into q_out / k_out
    when given."""
    return _launch(q, k, cos, sin, q_out, k_out, negate_sin=False, names=("q_out", "k_out"))


def rope_backward(grad_q_out: Tensor, grad_k_out: Tensor, cos: Tensor, sin: Tensor, grad_q: Tensor | None = None,
                  grad_k: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of q and k from those of the outputs: the rotation by the negative angle (see the module
    docstring), written into grad_q / grad_k when given."""
    return _launch(grad_q_out, grad_k_out, cos, sin, grad_q, grad_k, negate_sin=True, names=("grad_q", "grad_k"))


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        q_out, k_out = rope_forward(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q_out: Tensor, grad_k_out: Tensor):
        # An output unused by the loss arrives as zeros (materialize_grads); an expanded grad (from .sum())
        # has last-dim stride 0 and is made contiguous by the host.
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = rope_backward(grad_q_out, grad_k_out, cos, sin)
        return grad_q, grad_k, None, None  # cos and sin are not learned


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE on q (B, T, Hq, D) and k (B, T, Hk, D) with cos/sin (B or 1, T, D/2) in one kernel launch each way;
    same result as rope_ref. Gradients flow to q and k, not to cos and sin."""
    return RopeFunction.apply(q, k, cos, sin)


def rope_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Eager reference: apply_rope_ref (the model's eager path, model.rope.apply_rope) on q and on k."""
    return apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
