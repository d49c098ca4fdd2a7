"""Cross-entropy over a vocabulary in one Triton program per row, with its gradient written in the forward pass.

Per row i of logits x (V,) with label y (learnable unless y == ignore_index), all in fp32 whatever x's dtype:

    z     = c * tanh(x / c) if softcap c > 0 (Gemma 2 caps final logits at 30), else x;   dz/dx = 1 - (z / c)^2
    lse   = logsumexp_j z_j
    loss  = lse - (1 - eps) * z_y - (eps / V) * sum_j z_j        (label smoothing eps, Szegedy et al. 2016; this is
                                                                 F.cross_entropy(label_smoothing=eps) exactly)
          + w * lse^2                                           (z-loss of weight w, PaLM, Chowdhery et al. 2022)
    d loss / d z_j = softmax_j(z) * (1 + 2 w lse) - (1 - eps) [j == y] - eps / V,   times dz/dx under a softcap
    correct = argmax_j x_j == y                                 (the first maximal index, as torch.argmax)

Ignored rows have loss 0 and gradient 0 (written as zeros: the gradient buffer may be the logits themselves).

The first sweep over a row reads it once in blocks of BLOCK_V, keeping a running max m and a running sum
d = sum_j exp(z_j - m) that is rescaled by exp(m_old - m_new) whenever the max grows (the online softmax
normaliser of Milakov & Gimelshein 2018), so lse = m + log d needs no second pass. The same sweep picks up z_y
(by comparing column offsets with y: the label is never used as an address, so a label outside [0, V) cannot read
out of bounds; such a row's loss is NaN instead, and check_loss_rows names it), sum_j z_j, and a running argmax.
Logits holding inf or NaN give an inf or NaN loss (and gradient), never a finite wrong one: a sum of exp() over
a row propagates them, and the caller sees a non-finite loss (train.py's on_nan decides what happens).
When a gradient buffer is given, a second sweep recomputes softmax from lse and stores the gradient, times a
grad_scale read from device memory (for "mean", 1 / n_learnable without a host sync). Each element is read before
the same program writes it, so the buffer may alias the logits. The layout follows Liger-Kernel's
ops/cross_entropy.py (Hsu et al. 2024); the backward only rescales the stored rows by the upstream gradient.

Memory layout: logits (N, V) with row stride logits.stride(0) (any; e.g. a slice of a wider buffer) and column
stride 1; the gradient buffer likewise with its own row stride; labels, loss, lse and correct are contiguous (N,).
Row offsets are int64: N * V passes 2^31 at 16k rows of a 201k vocabulary.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import check_loss_rows

# Input bytes per block: 16k bf16 or 8k fp32 columns, so a 201k vocabulary takes 13-25 blocks a sweep. With 16 warps
# (512 threads) a thread holds 32 (bf16) or 16 (fp32) values of each live block tensor: ptxas for sm_90a reports
# at most 128 registers and no spills for every variant, so one program fills an SM's register file. Liger runs
# 32k columns on 32 warps, the same per thread. Not tuned: bench/ is the place to sweep it. Tests lower it so that
# a row spans several blocks.
MAX_BLOCK_BYTES = 32768


def _launch_config(vocab_size: int, element_size: int) -> tuple[int, int]:
    block_v = min(triton.next_power_of_2(vocab_size), max(16, MAX_BLOCK_BYTES // element_size))
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4  # enough threads per row to keep loads wide
    return block_v, num_warps


@triton.jit
def _softcap(x, c):
    # c * tanh(x / c), tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) in (0, 1]: no overflow, +-inf -> +-c
    e = tl.exp(-2.0 * tl.abs(x / c))
    t = (1.0 - e) / (1.0 + e)
    return c * tl.where(x < 0.0, -t, t)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_stride,  # (N, V), column stride 1
    labels_ptr,  # (N,) int32 or int64
    loss_ptr, lse_ptr, correct_ptr,  # (N,) fp32, fp32, int8: outputs
    grad_ptr, grad_stride,  # (N, V), column stride 1, may alias logits; untouched unless HAS_GRAD
    grad_scale_ptr,  # (1,) fp32; read only if HAS_GRAD_SCALE
    ignore_index, label_smoothing, softcap, z_loss,
    V: tl.constexpr,  # see the note below the kernels
    HAS_GRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride
    y = tl.load(labels_ptr + row).to(tl.int64)

    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        tl.store(correct_ptr + row, 0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(g_row + cols, tl.zeros((BLOCK_V,), dtype=grad_ptr.dtype.element_ty), mask=cols < V)
        return

    # first sweep: online max m and sum d of exp(z - m); z_y, sum z, and the running argmax of x
    m = float("-inf")
    d = 0.0
    z_y = 0.0
    z_sum = 0.0
    best = float("-inf")
    best_col = 0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
        block_max, block_arg = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        better = block_max > best  # strictly: an equal max in a later block keeps the earlier index
        best_col = tl.where(better, start + block_arg, best_col)
        best = tl.where(better, block_max, best)
        if HAS_SOFTCAP:
            z = tl.where(mask, _softcap(x, softcap), float("-inf"))
            z_max = tl.max(z, axis=0)
        else:
            z = x
            z_max = block_max
        m_new = tl.maximum(m, z_max)
        # while every z so far is -inf (a masked-out vocabulary head), shift by 0 rather than by -inf: -inf - -inf
        # would be NaN, where exp(-inf - 0) = 0 is the right contribution
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        if (y >= start) & (y < start + BLOCK_V):  # the label's block: one reduction per row, not one per block
            z_y = tl.sum(tl.where(cols == y, z, 0.0), axis=0)

    lse = m + tl.log(d)
    loss = lse - (1.0 - label_smoothing) * z_y + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= label_smoothing / V * z_sum
    loss = tl.where((y >= 0) & (y < V), loss, float("nan"))  # a label out of range: flagged, never loaded
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    tl.store(correct_ptr + row, (best_col == y).to(tl.int8))

    if HAS_GRAD:
        # second sweep: d loss / d x_j = (softmax_j (1 + 2 w lse) - (1 - eps) [j == y] - eps / V) * dz/dx, scaled
        if HAS_GRAD_SCALE:
            scale = tl.load(grad_scale_ptr)
        else:
            scale = 1.0
        p_scale = (1.0 + 2.0 * z_loss * lse) * scale  # d loss / d lse, times the scale
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)  # read before the write below
            if HAS_SOFTCAP:
                z = _softcap(x, softcap)
            else:
                z = x
            g = tl.exp(z - lse) * p_scale  # (BLOCK_V,)
            g = tl.where(cols == y, g - (1.0 - label_smoothing) * scale, g)
            if HAS_SMOOTHING:
                g -= label_smoothing / V * scale
            if HAS_SOFTCAP:
                g *= 1.0 - (z / softcap) * (z / softcap)
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(grad_ptr, grad_stride, scale_ptr, scale_stride, V: tl.constexpr, BLOCK_V: tl.constexpr):
    # grad[row, block] *= scale[row * scale_stride]; scale_stride is 0 for a scalar scale
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(scale_ptr + row * scale_stride)
    if s == 1.0:  # loss.backward(): nothing to do, and no row is read or written
        return
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    ptrs = grad_ptr + row * grad_stride + cols
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (g * s).to(grad_ptr.dtype.element_ty), mask=mask)


# V is a compile-time constant: one compilation per vocabulary size, which a model has one of. As a runtime int, the
# loop bound range(0, V, BLOCK_V) fails under Triton 3.6's interpreter with numpy >= 2.4 (it calls int() on a
# 1-element array, which numpy 2.4 made an error), so the CPU tests could not run the kernels at all.


def _check_inputs(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V) after flattening, got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}: "
                         "labels need the logits' shape without the vocabulary dimension")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}: use labels.long()")
    if logits.numel() and logits.stride(1) != 1:
        raise ValueError(f"logits need column stride 1, got strides {logits.stride()}: pass logits.contiguous()")


def cross_entropy_forward(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                          softcap: float = 0.0, z_loss: float = 0.0, grad: Tensor | None = None,
                          grad_scale: Tensor | None = None, loss_out: Tensor | None = None,
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(loss_rows fp32 (N,), lse_rows fp32 (N,), correct_rows bool (N,)) for logits (N, V) and labels (N,).

    grad, if given, is an (N, V) buffer (the logits themselves for in-place) that receives d loss_i / d logits_i
    times grad_scale (a 1-element fp32 tensor on the device; None means 1). Rows are not checked here: call
    check_loss_rows on the loss rows (once, after all chunks) to turn bad labels into errors; rows whose logits hold
    inf or NaN keep their non-finite loss.
    """
    _check_inputs(logits, labels)
    if not 0.0 <= label_smoothing <= 1.0 or softcap < 0.0 or z_loss < 0.0:
        raise ValueError(f"need 0 <= label_smoothing <= 1, softcap >= 0, z_loss >= 0; got {label_smoothing}, "
                         f"{softcap}, {z_loss}")
    n_rows, vocab_size = logits.shape
    device = logits.device
    if loss_out is None:
        loss_out = torch.empty(n_rows, dtype=torch.float32, device=device)
    elif loss_out.shape != (n_rows,) or loss_out.dtype != torch.float32 or not loss_out.is_contiguous():
        raise ValueError(f"loss_out must be a contiguous fp32 ({n_rows},) tensor, got {loss_out.dtype} "
                         f"{tuple(loss_out.shape)}")
    lse = torch.empty(n_rows, dtype=torch.float32, device=device)  # (N,)
    correct = torch.empty(n_rows, dtype=torch.int8, device=device)  # (N,) viewed as bool on return
    if grad is not None and (grad.shape != logits.shape or not grad.is_floating_point()
                             or (grad.numel() and grad.stride(1) != 1)):
        raise ValueError(f"grad must be a floating (N, V) = {tuple(logits.shape)} buffer with column stride 1, "
                         f"got {grad.dtype} {tuple(grad.shape)} strides {grad.stride()}")
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.dtype != torch.float32):
        raise ValueError(f"grad_scale must be a 1-element fp32 tensor, got {grad_scale.dtype} "
                         f"{tuple(grad_scale.shape)}")
    if n_rows == 0:
        return loss_out, lse, correct.view(torch.bool)
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.long()
    block_v, num_warps = _launch_config(vocab_size, logits.element_size())
    g = logits if grad is None else grad  # a placeholder pointer when there is no gradient
    _cross_entropy_kernel[(n_rows,)](
        logits, logits.stride(0), labels.contiguous(), loss_out, lse, correct, g, g.stride(0),
        loss_out if grad_scale is None else grad_scale,
        ignore_index, float(label_smoothing), float(softcap), float(z_loss),
        V=vocab_size, HAS_GRAD=grad is not None, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_SMOOTHING=label_smoothing > 0.0, HAS_SOFTCAP=softcap > 0.0, BLOCK_V=block_v, num_warps=num_warps,
    )
    return loss_out, lse, correct.view(torch.bool)


def scale_rows_(grad: Tensor, scale: Tensor) -> Tensor:
    """grad (N, V) *= scale in place, scale a 0-dim tensor or one per row (N,), read on the device (no host sync).

    Rows whose scale is exactly 1 are left untouched (for a scalar 1, the whole backward costs one launch).
    """
    scale = scale.detach().to(device=grad.device, dtype=torch.float32)
    if scale.dim() == 0:
        scale_stride = 0
    elif scale.shape == grad.shape[:1]:
        scale_stride = scale.stride(0)
    else:
        raise ValueError(f"scale must be a scalar or one value per row ({grad.shape[0]},), got {tuple(scale.shape)}")
    n_rows, vocab_size = grad.shape
    if grad.numel() == 0:
        return grad
    block_v, num_warps = _launch_config(vocab_size, grad.element_size())
    grid = (n_rows, triton.cdiv(vocab_size, block_v))
    _scale_rows_kernel[grid](grad, grad.stride(0), scale, scale_stride, V=vocab_size, BLOCK_V=block_v,
                             num_warps=num_warps)
    return grad


def _reduce(loss_rows: Tensor, n_learnable: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":  # over learnable rows; 0 / 1 = 0 when there are none
        return loss_rows.sum() / n_learnable.clamp(min=1)
    return loss_rows.sum() if reduction == "sum" else loss_rows


class CrossEntropyFunction(torch.autograd.Function):
    """(loss, n_correct) of logits (N, V) and labels (N,), the gradient computed during forward (see cross_entropy)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, reduction: str, label_smoothing: float,
                softcap: float, z_loss: float, inplace_grad: bool):
        n_learnable = (labels != ignore_index).sum()  # int64 scalar, on the device
        grad_scale = None
        if reduction == "mean":  # fold d mean / d loss_i = 1 / n into the stored gradient now, with no host sync
            grad_scale = (1.0 / n_learnable.clamp(min=1)).to(torch.float32).reshape(1)
        grad = logits if inplace_grad else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        loss_rows, _, correct = cross_entropy_forward(
            logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
            z_loss=z_loss, grad=grad, grad_scale=grad_scale)
        check_loss_rows(loss_rows, labels, logits.shape[1], ignore_index)
        if inplace_grad:
            _increment_version(logits)  # any other saved use of the logits now fails at backward, loudly
        ctx.save_for_backward(grad)  # after the version bump, so this saved tensor itself stays valid
        n_correct = correct.sum()
        ctx.mark_non_differentiable(n_correct)
        return _reduce(loss_rows, n_learnable, reduction), n_correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_n_correct: Tensor):
        (grad,) = ctx.saved_tensors
        scale_rows_(grad, grad_loss)  # (N, V) *= the upstream gradient, a scalar or one per row for "none"
        _increment_version(grad)  # the rows are scaled in place: a second backward through this graph must fail
        return grad, None, None, None, None, None, None, None


def _increment_version(t: Tensor) -> None:
    increment = getattr(torch.autograd.graph, "increment_version", None)
    if increment is not None:
        increment(t)


def cross_entropy(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, softcap: float = 0.0, z_loss: float = 0.0,
                  inplace_grad: bool = False) -> tuple[Tensor, Tensor]:
    """(loss, n_correct) of logits (..., V) against labels (...), with the module docstring's options.

    loss is fp32: the mean over learnable rows ("mean", 0 when none is learnable), their sum ("sum"), or per row
    ("none", shaped like labels, 0 on ignored rows). n_correct is the int64 count of learnable rows whose argmax is
    the label. When the logits require grad, the gradient is computed here and kept until backward: in a fresh
    buffer, or with inplace_grad=True in the logits' own memory, which saves one (N, V) tensor but overwrites the
    logits: the caller must never read them afterwards (autograd refuses any other saved use of them at backward).
    Raises ValueError for malformed inputs and labels outside [0, V) other than ignore_index (one host sync per
    call); learnable rows whose logits hold inf or NaN give an inf or NaN loss, for the caller to handle.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}: "
                         "labels need the logits' shape without the vocabulary dimension")
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, V), a view when it can be
    if flat_logits.stride(1) != 1:
        flat_logits = flat_logits.contiguous()
    flat_labels = labels.reshape(-1)  # (N,)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, n_correct = CrossEntropyFunction.apply(flat_logits, flat_labels, ignore_index, reduction,
                                                     label_smoothing, softcap, z_loss, inplace_grad)
    else:
        loss_rows, _, correct = cross_entropy_forward(flat_logits.detach(), flat_labels, ignore_index=ignore_index,
                                                      label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss)
        check_loss_rows(loss_rows, flat_labels, flat_logits.shape[1], ignore_index)
        loss, n_correct = _reduce(loss_rows, (flat_labels != ignore_index).sum(), reduction), correct.sum()
    return (loss.view(labels.shape) if reduction == "none" else loss), n_correct


def cross_entropy_ref(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                      label_smoothing: float = 0.0, softcap: float = 0.0, z_loss: float = 0.0
                      ) -> tuple[Tensor, Tensor]:
    """cross_entropy in eager PyTorch (F.cross_entropy in fp32, or fp64 for fp64 logits): what the tests hold it to."""
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    z = flat.to(torch.promote_types(flat.dtype, torch.float32))
    if softcap > 0.0:
        z = softcap * torch.tanh(z / softcap)
    learnable = flat_labels != ignore_index  # (N,)
    rows = torch.nn.functional.cross_entropy(z, flat_labels, ignore_index=ignore_index, reduction="none",
                                             label_smoothing=label_smoothing)  # (N,), 0 on ignored rows
    rows = rows + torch.where(learnable, z_loss * torch.logsumexp(z, dim=-1) ** 2, 0.0)
    n_correct = ((flat.detach().argmax(dim=-1) == flat_labels) & learnable).sum()
    loss = _reduce(rows, learnable.sum(), reduction)
    return (loss.view(labels.shape) if reduction == "none" else loss), n_correct
