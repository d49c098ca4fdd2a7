"""Language-model cross-entropy returned as sums, so callers can normalise over any number of micro-batches/ranks.

    loss_sum = sum over learnable rows i of  logsumexp(logits_i) - logits_i[label_i]
    d loss_sum / d logits_i = softmax(logits_i) - onehot(label_i)      (0 for ignored rows)

lm_head_loss(..., reduction="sum") is the default and the fast path: only these sums. reduction="none" also returns
the per-token losses (B, T) and their sums per sample (a packed document of cu_seqlens, else a row), through the
same chunked paths (never holding (tokens x vocab) logits with the fused loss); per-token loss_weights w multiply
the per-token losses, loss_sum = sum_i w_i loss_i, and go through the same per-token path.

lm_loss computes this chunk by chunk over rows, in fp32, without keeping a (rows, vocab) tensor of log-probabilities
for the backward pass: the backward recomputes softmax per chunk from the logits. F.cross_entropy would keep fp32
log-probs (twice the size of bf16 logits) and allocate two more (rows, vocab) tensors in its backward; at a 50k-128k
vocabulary these dominate the memory and, on a CPU, the time of a small model's step. lm_loss_ref below is the plain
F.cross_entropy version; the tests hold lm_loss to it.

Every path here (lm_loss, the fused chunks, the Triton kernels) treats bad rows alike: a learnable label outside
[0, V) is a ValueError naming it (kernels.check_loss_rows), while logits holding inf or NaN give an inf or NaN loss,
so that a diverging run is handled by the caller (train.py's on_nan), not by an exception from inside the loss.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import KernelConfig, check_loss_rows
from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy


REDUCTIONS = ("sum", "none")


class LossOutput(NamedTuple):
    loss_sum: Tensor  # fp32 scalar: sum of per-token cross-entropy (times loss_weights) over learnable positions
    n_tokens: Tensor  # int64 scalar: number of positions whose label != ignore_index (unweighted)
    n_correct: Tensor  # int64 scalar: learnable positions where argmax(logits) == label
    aux_loss: Tensor | float = 0.0  # fp32 scalar, a mean: router losses of mixture-of-experts models (else 0)
    # reduction="none" only (else None); gradients flow through all three losses
    token_losses: Tensor | None = None  # (B, T) fp32: each position's loss (times its weight), 0 where ignored
    sample_losses: Tensor | None = None  # (n_samples,) fp32: token_losses summed per sample (document, or row)
    sample_tokens: Tensor | None = None  # (n_samples,) int64: learnable positions per sample


def _rows_per_chunk(logits: Tensor) -> int:
    # fp32 temporaries of 16 MiB on CPU: small enough for malloc to reuse them (no fresh pages each chunk);
    # 128 MiB on GPU, where fewer, larger chunks mean fewer kernel launches
    elements = 2**22 if logits.device.type == "cpu" else 2**25
    return max(1, elements // logits.shape[1])


class _ChunkedCrossEntropy(torch.autograd.Function):
    """(loss_sum, n_correct) for logits (N, V) of any float dtype and labels (N,), or with per_row the row losses
    (N,) fp32 in place of loss_sum; see the module docstring."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, reuse_logits: bool, per_row: bool = False):
        learnable = labels != ignore_index  # (N,)
        out_of_range = learnable & ((labels < 0) | (labels >= logits.shape[1]))  # (N,) bad input: named below
        target = torch.where(learnable & ~out_of_range, labels, 0)  # (N,) an index that is valid on every row
        row_loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        argmax = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)  # (N,)
        step = _rows_per_chunk(logits)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            chunk = logits[rows].float()  # (n, V) fp32
            log_probs = torch.log_softmax(chunk, dim=-1)  # (n, V)
            row_loss[rows] = -log_probs.gather(1, target[rows, None]).squeeze(1)
            argmax[rows] = chunk.max(dim=-1).indices  # the first maximal index, as argmax; max(dim) is faster
        row_loss = torch.where(learnable, row_loss, 0.0).masked_fill(out_of_range, float("nan"))
        check_loss_rows(row_loss, labels, logits.shape[1], ignore_index)  # inf/NaN logits pass: a non-finite loss
        n_correct = ((argmax == labels) & learnable).sum()
        ctx.save_for_backward(logits, target, learnable)
        ctx.reuse_logits = reuse_logits
        ctx.mark_non_differentiable(n_correct)
        return (row_loss if per_row else row_loss.sum()), n_correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_n_correct: Tensor):
        # with reuse_logits, a second backward through the same graph fails autograd's version check right here
        logits, target, learnable = ctx.saved_tensors
        grad = logits if ctx.reuse_logits else torch.empty_like(logits)  # (N, V) in the logits' dtype
        scale = (grad_loss.float() * learnable)[:, None]  # (N, 1): d loss / d row_loss (a scalar, or per row)
        step = _rows_per_chunk(logits)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            g = torch.softmax(logits[rows].float(), dim=-1)  # (n, V) fp32
            g.mul_(scale[rows])
            g.scatter_add_(1, target[rows, None], -scale[rows])  # softmax - onehot(label), scaled
            grad[rows] = g
        return grad, None, None, None, None


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100, reuse_logits: bool = False) -> LossOutput:
    """Summed cross-entropy of logits (B, T, V) against labels (B, T), computed in fp32.

    Labels are already aligned with the logits (label t is the token that follows input t): nothing is shifted
    here. Positions labelled ignore_index count in neither the loss nor the accuracy. A batch with no learnable
    position gives loss_sum 0 (an empty sum, whose gradient is zero, never NaN) and n_tokens 0; the mean loss is
    loss_sum / n_tokens, to be taken by the caller over the whole step.

    reuse_logits=True lets the backward pass write the gradient into the logits' own memory, saving one
    (B, T, V) tensor: only for callers that never read the logits after backward (the model's forward).
    """
    vocab_size = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab_size)  # (B*T, V)
    flat_labels = labels.reshape(-1)  # (B*T,)
    loss_sum, n_correct = _ChunkedCrossEntropy.apply(flat_logits, flat_labels, ignore_index, reuse_logits)
    n_tokens = (flat_labels != ignore_index).sum()
    return LossOutput(loss_sum, n_tokens, n_correct)


def lm_token_losses(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                    reuse_logits: bool = False) -> tuple[Tensor, Tensor]:
    """(per-token losses (B, T) fp32, 0 where ignored; n_correct) of logits (B, T, V): lm_loss's chunks, unsummed."""
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    rows, n_correct = _ChunkedCrossEntropy.apply(flat_logits, labels.reshape(-1), ignore_index, reuse_logits, True)
    return rows.view(labels.shape), n_correct


def lm_loss_ref(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> LossOutput:
    """The same quantities with F.cross_entropy: the reference lm_loss is tested against."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
    flat_labels = labels.reshape(-1)  # (B*T,)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    learnable = flat_labels != ignore_index  # (B*T,)
    n_correct = ((flat_logits.detach().argmax(dim=-1) == flat_labels) & learnable).sum()
    return LossOutput(loss_sum, learnable.sum(), n_correct)


def sample_sums(token_losses: Tensor, learnable: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """(sample_losses (n_samples,) fp32, sample_tokens (n_samples,) int64) of per-token losses (B, T): sums over
    each packed sample of cu_seqlens (offsets over the flattened B * T tokens), or over each row without it."""
    if cu_seqlens is None:
        return token_losses.sum(dim=1), learnable.sum(dim=1)
    B, T = token_losses.shape
    n_samples = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.to(token_losses.device, non_blocking=True)  # (n_samples + 1,) a host-to-device copy, no sync
    flat = torch.arange(B * T, device=token_losses.device)  # (B*T,)
    sample = torch.searchsorted(cu.to(torch.int64), flat, right=True) - 1  # (B*T,) the sample of each token
    losses = token_losses.new_zeros(n_samples).index_add(0, sample, token_losses.reshape(-1))  # (n_samples,)
    tokens = torch.zeros(n_samples, dtype=torch.int64, device=flat.device).index_add_(
        0, sample, learnable.reshape(-1).long())  # (n_samples,)
    return losses, tokens


def _summed_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, kernels: KernelConfig, softcap: float,
                 ignore_index: int) -> LossOutput:
    """reduction "sum" without weights: the fast path, only the three sums."""
    n_tokens = (labels != ignore_index).sum()
    triton_loss = kernels.use("cross_entropy", hidden)
    if kernels.fused_loss():
        loss_sum, n_correct = fused_linear_cross_entropy(hidden, head.weight, labels, head.bias, reduction="sum",
                                                         softcap=softcap, ignore_index=ignore_index,
                                                         use_triton=triton_loss)
        return LossOutput(loss_sum, n_tokens, n_correct)
    logits = head(hidden)  # (B, T, V)
    if triton_loss:
        from kernels.cross_entropy import cross_entropy

        loss_sum, n_correct = cross_entropy(logits, labels, reduction="sum", softcap=softcap,
                                            ignore_index=ignore_index, inplace_grad=True)
        return LossOutput(loss_sum, n_tokens, n_correct)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return lm_loss(logits, labels, ignore_index, reuse_logits=True)  # the logits never leave this function


def _token_losses(hidden: Tensor, head: nn.Linear, labels: Tensor, kernels: KernelConfig, softcap: float,
                  ignore_index: int) -> tuple[Tensor, Tensor]:
    """(per-token losses (B, T) fp32, 0 where ignored; n_correct) by the same paths as _summed_loss."""
    triton_loss = kernels.use("cross_entropy", hidden)
    if kernels.fused_loss():  # its backward recomputes each chunk with every row's own upstream gradient
        return fused_linear_cross_entropy(hidden, head.weight, labels, head.bias, reduction="none", softcap=softcap,
                                          ignore_index=ignore_index, use_triton=triton_loss)
    logits = head(hidden)  # (B, T, V)
    if triton_loss:
        from kernels.cross_entropy import cross_entropy

        return cross_entropy(logits, labels, reduction="none", softcap=softcap, ignore_index=ignore_index,
                             inplace_grad=True)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return lm_token_losses(logits, labels, ignore_index, reuse_logits=True)


def lm_head_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, kernels: KernelConfig, softcap: float = 0.0,
                 ignore_index: int = -100, *, reduction: str = "sum", loss_weights: Tensor | None = None,
                 cu_seqlens: Tensor | None = None) -> LossOutput:
    """The LossOutput of logits = softcap(head(hidden)) (B, T, V) against labels (B, T), by the path the kernel
    switches choose (see kernels.KernelConfig), all of them the same sums:

    - fused linear cross-entropy (default): chunk by chunk from the hidden states, never holding the (B, T, V)
      logits; each chunk's loss by the Triton kernel on CUDA, by PyTorch elsewhere;
    - else the full logits, then the Triton cross-entropy kernel (gradient written into the logits), or lm_loss.
    softcap > 0 caps the logits as cap * tanh(logits / cap) (Gemma2's final softcap) inside the loss.

    reduction "sum" (default) returns the sums only; "none" adds token_losses (B, T), sample_losses and
    sample_tokens (n_samples,), the samples being cu_seqlens' packed documents, or the rows when it is None.
    loss_weights (B, T) multiply each position's loss (loss_sum = sum_i w_i loss_i over learnable positions;
    n_tokens still counts them unweighted) and take the per-token path whatever the reduction.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} unknown; expected one of {REDUCTIONS}")
    if reduction == "sum" and loss_weights is None:
        return _summed_loss(hidden, head, labels, kernels, softcap, ignore_index)
    if loss_weights is not None and loss_weights.shape != labels.shape:
        raise ValueError(f"loss_weights {tuple(loss_weights.shape)} must match labels {tuple(labels.shape)}")
    learnable = labels != ignore_index  # (B, T)
    token_losses, n_correct = _token_losses(hidden, head, labels, kernels, softcap, ignore_index)  # (B, T) fp32
    if loss_weights is not None:
        token_losses = token_losses * torch.where(learnable, loss_weights.float(), 0.0)  # (B, T)
    out = LossOutput(token_losses.sum(), learnable.sum(), n_correct)
    if reduction == "sum":
        return out
    sample_losses, sample_tokens = sample_sums(token_losses, learnable, cu_seqlens)
    return out._replace(token_losses=token_losses, sample_losses=sample_losses, sample_tokens=sample_tokens)
