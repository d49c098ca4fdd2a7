"""Fused linear cross-entropy: the loss of logits = hidden @ weight.T (+ bias) without ever holding all the logits.

At a 201,088-token vocabulary, the logits of a 16k-token batch take 6.6 GB in bf16, their fp32 softmax twice that,
and their gradient as much again: the loss, not the model, decides how long a context fits. Here the N rows of
hidden states are cut into chunks of n rows; each chunk is projected to its (n, V) logits, its loss and the
gradient of the loss with respect to those logits are computed at once (the cross-entropy kernel of
kernels/cross_entropy.py on a GPU, the PyTorch function `chunk_loss_and_grad` below elsewhere), and the chunk's
contributions to the input gradients are accumulated straight away, after which the chunk's logits are dropped:

    logits_c = h_c @ W.T + b                 (n, V)   in the compute dtype (bf16 under autocast)
    g_c      = d loss / d logits_c           (n, V)   written over logits_c
    grad_h_c = g_c @ W                       (n, H)
    grad_W  += g_c.T @ h_c                   (V, H)
    grad_b  += g_c.sum(0)                    (V,)

Only one chunk of logits exists at a time: the extra memory is grad_h (N, H), grad_W (V, H) and one (n, V) chunk,
against the (N, V) logits, softmax and gradient of the unfused loss. The gradients are computed in the forward
pass, which saves re-projecting the hidden states in the backward pass (3 matrix products in all, as the unfused
loss), and the backward pass only multiplies them by the upstream gradient. Reduction "none" is the exception:
its upstream gradient differs per row, and grad_W sums over rows, so its backward recomputes the chunks with each
row's own weight (one more projection).

The idea follows Wijmans et al. 2024 ("Cut Your Losses in Large-Vocabulary Language Models") and Liger-Kernel's
fused linear cross-entropy; the chunking here is plain PyTorch around the row kernel.

Precision: matrix products run in the compute dtype with fp32 accumulation inside each product; the loss is fp32.
grad_W is accumulated across chunks in the weight's dtype: fp32 for fp32 master weights under autocast (each
chunk's bf16 product added in fp32), in place in bf16 for bf16 weights (one bf16 rounding per chunk).
"""

import math

import torch
from torch import Tensor

from kernels import check_loss_rows

REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- one chunk, in PyTorch


def chunk_loss_and_grad(logits: Tensor, labels: Tensor, *, ignore_index: int, label_smoothing: float, softcap: float,
                        z_loss: float, grad_scale: Tensor | None, write_grad: bool) -> tuple[Tensor, Tensor]:
    """Per-row loss (n,) fp32 and correct (n,) bool of logits (n, V); with write_grad, d loss_i / d logits_i times
    grad_scale (a 1-element tensor, or per-row (n,)) overwrites the logits. The PyTorch twin of
    kernels.cross_entropy.cross_entropy_forward, with the same math:

        z = softcap * tanh(x / softcap)  (or z = x),   lse = logsumexp(z)
        loss_i = lse - (1 - eps) z_y - (eps / V) sum_j z_j + w lse^2        (0 on rows labelled ignore_index)
        d loss_i / d z_j = softmax_j (1 + 2 w lse) - (1 - eps) [j = y] - eps / V,   d z / d x = 1 - (z / softcap)^2
    """
    V = logits.shape[1]
    learnable = labels != ignore_index  # (n,)
    out_of_range = learnable & ((labels < 0) | (labels >= V))  # (n,) their loss is NaN: check_loss_rows names them
    target = torch.where(learnable & ~out_of_range, labels, 0)[:, None]  # (n, 1) a valid index on every row
    x = logits.float()  # (n, V) fp32
    z = softcap * torch.tanh(x / softcap) if softcap else x  # (n, V)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    loss = lse - (1 - label_smoothing) * z.gather(1, target)  # (n, 1)
    if label_smoothing:
        loss = loss - label_smoothing / V * z.sum(dim=-1, keepdim=True)
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(learnable, loss.squeeze(1), 0.0).masked_fill(out_of_range, float("nan"))  # (n,)
    correct = (x.argmax(dim=-1) == labels) & learnable  # (n,) argmax of the logits before any cap
    if write_grad:
        # g = scale * (softmax (1 + 2 w lse) - eps / V) - scale (1 - eps) [j = y], times dz/dx, built in place in
        # a buffer that is no longer needed: z under a softcap, else x (the logits themselves when fp32)
        scale = learnable.float() if grad_scale is None else learnable * grad_scale.float().reshape(-1)  # (n,)
        scale = scale[:, None]  # (n, 1)
        dz = 1 - (z / softcap).square() if softcap else None  # (n, V)
        g = z
        g.sub_(lse).exp_().mul_(scale * (1 + 2 * z_loss * lse) if z_loss else scale)  # (n, V)
        if label_smoothing:
            g.sub_(scale * (label_smoothing / V))
        g.scatter_add_(1, target, -(1 - label_smoothing) * scale)
        if softcap:
            g.mul_(dz)
        if g.data_ptr() != logits.data_ptr():
            logits.copy_(g)
    return loss, correct


def _chunk_rows(n_rows: int, hidden_size: int, vocab_size: int, device: torch.device) -> int:
    """Rows per chunk. On a GPU: chunk logits no larger than the hidden states (n * V ~ N * H, as Liger sizes
    them), rounded up to a power of two, and at least 1024 rows, as thinner products leave the tensor cores idle.
    On a CPU: fp32 temporaries of 16 MiB, small enough for malloc to reuse them chunk after chunk."""
    if device.type == "cuda":
        rows = max(1024, 2 ** math.ceil(math.log2(max(1, math.ceil(n_rows * hidden_size / vocab_size)))))
    else:
        rows = max(1, 2**22 // vocab_size)
    return min(rows, n_rows)


# ----------------------------------------------------------------------------- the chunk loop


def _chunked_pass(h: Tensor, w: Tensor, b: Tensor | None, labels: Tensor, opts: dict, grad_scale: Tensor | None,
                  need: tuple[bool, bool, bool], use_triton: bool, chunk_rows: int, weight_dtype: torch.dtype):
    """Loss rows, correct rows and (grad_h, grad_w, grad_b) (None where not needed) of h (N, H) @ w.T (V, H)."""
    N, V = h.shape[0], w.shape[0]
    need_h, need_w, need_b = need
    write_grad = any(need)
    loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)  # (N,)
    correct = torch.empty(N, dtype=torch.bool, device=h.device)  # (N,)
    grad_h = torch.empty_like(h) if need_h else None  # (N, H)
    grad_w = torch.zeros(w.shape, dtype=weight_dtype, device=w.device) if need_w else None  # (V, H)
    grad_b = torch.zeros(V, dtype=torch.float32, device=w.device) if need_b else None  # (V,)
    if use_triton:
        from kernels.cross_entropy import cross_entropy_forward, scale_rows_
    for start in range(0, N, chunk_rows):
        rows = slice(start, start + chunk_rows)
        logits = h[rows] @ w.T  # (n, V) compute dtype
        if b is not None:
            logits += b
        per_row = grad_scale is not None and grad_scale.numel() > 1  # the backward of reduction "none"
        scale = grad_scale[rows] if per_row else grad_scale
        if use_triton:
            loss_rows[rows], _, correct[rows] = cross_entropy_forward(
                logits, labels[rows], **opts, grad=logits if write_grad else None,
                grad_scale=None if per_row else scale)
            if write_grad and per_row:
                scale_rows_(logits, scale)
        else:
            loss_rows[rows], correct[rows] = chunk_loss_and_grad(logits, labels[rows], **opts, grad_scale=scale,
                                                                 write_grad=write_grad)
        if not write_grad:
            continue
        g = logits  # (n, V) now holds d loss / d logits
        if need_h:
            torch.mm(g, w, out=grad_h[rows])  # (n, H)
        if need_w:
            if grad_w.dtype == g.dtype:
                grad_w.addmm_(g.T, h[rows])  # (V, H) accumulated in place
            else:
                grad_w += g.T @ h[rows]  # fp32 master weights: the chunk's bf16 product summed in fp32
        if need_b:
            grad_b += g.float().sum(dim=0)
    return loss_rows, correct, (grad_h, grad_w, grad_b)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """(loss, n_correct) of hidden (N, H), weight (V, H), bias (V,) or None, labels (N,); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                reduction: str, label_smoothing: float, softcap: float, z_loss: float, use_triton: bool,
                chunk_rows: int, need: tuple[bool, bool, bool]):
        dtype = hidden.dtype  # the compute dtype (the wrapper has already applied autocast's)
        w = weight.to(dtype)  # (V, H) one copy when the weight is an fp32 master under autocast
        b = bias.to(dtype) if bias is not None else None
        opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss)
        learnable = labels != ignore_index  # (N,)
        n_learn = learnable.sum()
        # "mean" folds 1 / n_learnable into the gradients as they are written (a device scalar: no host sync); an
        # empty batch divides by 1, so its loss and gradients are 0, never NaN
        grad_scale = 1.0 / n_learn.clamp(min=1).float().reshape(1) if reduction == "mean" else None
        per_row = reduction == "none"
        loss_rows, correct, grads = _chunked_pass(hidden, w, b, labels, opts, grad_scale,
                                                  (False, False, False) if per_row else need, use_triton,
                                                  chunk_rows, weight.dtype)
        check_loss_rows(loss_rows, labels, weight.shape[0], ignore_index)  # bad labels; inf/NaN rows pass
        if reduction == "mean":
            loss = loss_rows.sum() / n_learn.clamp(min=1)
        elif reduction == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows
        n_correct = correct.sum()
        ctx.mark_non_differentiable(n_correct)
        ctx.reduction, ctx.need, ctx.bias_dtype = reduction, need, None if bias is None else bias.dtype
        if per_row:  # the backward recomputes the chunks with each row's upstream gradient
            ctx.save_for_backward(hidden, weight, bias, labels)
            ctx.recompute = (opts, use_triton, chunk_rows)
        else:
            ctx.grads = grads
        return loss, n_correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_n_correct: Tensor):
        if ctx.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            opts, use_triton, chunk_rows = ctx.recompute
            w = weight.to(hidden.dtype)
            b = bias.to(hidden.dtype) if bias is not None else None
            _, _, grads = _chunked_pass(hidden, w, b, labels, opts, grad_loss.float(), ctx.need, use_triton,
                                        chunk_rows, weight.dtype)
        else:
            if ctx.grads is None:
                raise RuntimeError("fused_linear_cross_entropy computes its gradients in the forward pass and gives "
                                   "them out once: backward through it a second time (retain_graph) is not supported")
            grads, ctx.grads = ctx.grads, None
            for g in grads:
                if g is not None:
                    g.mul_(grad_loss.to(g.dtype))
        grad_h, grad_w, grad_b = grads
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
                               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                               softcap: float = 0.0, z_loss: float = 0.0, use_triton: bool = False,
                               chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """(loss, n_correct) of the logits hidden (..., H) @ weight.T (V, H) + bias (V,) against labels (...), the same
    quantities as kernels.cross_entropy.cross_entropy on the full logits: reduction "mean" over learnable rows (0 when
    there are none), "sum", or "none" (per row, fp32); label_smoothing, softcap (cap * tanh(logits / cap)) and z_loss
    (w * logsumexp^2) as there; n_correct counts learnable rows whose argmax equals the label.

    The logits are never held whole (see the module docstring). use_triton computes each chunk's loss and gradient
    with the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), else in PyTorch. Under autocast the products run
    in autocast's dtype, as an nn.Linear would. A tied embedding is just a weight shared with the embedding: its
    gradient adds up with the embedding's through autograd.
    """
    H = weight.shape[1]
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} unknown; expected one of {REDUCTIONS}")
    if weight.dim() != 2 or hidden.shape[-1] != H:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match: expected "
                         f"hidden (..., H) and weight (vocab_size, H)")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}: expected "
                         f"labels of shape {tuple(hidden.shape[:-1])}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}: expected "
                         f"({weight.shape[0]},)")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    device_type = hidden.device.type
    h = hidden.reshape(-1, H)  # (N, H)
    if torch.is_autocast_enabled(device_type):
        h = h.to(torch.get_autocast_dtype(device_type))  # the dtype an nn.Linear would compute in
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    rows = chunk_rows or _chunk_rows(h.shape[0], H, weight.shape[0], h.device)
    with torch.autocast(device_type, enabled=False):
        loss, n_correct = FusedLinearCrossEntropyFunction.apply(
            h, weight, bias, labels.reshape(-1), ignore_index, reduction, label_smoothing, softcap, z_loss,
            use_triton, rows, need)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return loss, n_correct


def fused_linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
                                   ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                                   softcap: float = 0.0, z_loss: float = 0.0) -> tuple[Tensor, Tensor]:
    """The unfused reference: the full logits in fp32 (fp64 for fp64 inputs), then kernels.cross_entropy's eager
    reference."""
    from kernels.cross_entropy import cross_entropy_ref

    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return cross_entropy_ref(logits, labels, ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss)
