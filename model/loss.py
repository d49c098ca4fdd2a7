"""Language-model cross-entropy returned as sums, so callers can normalise over any number of micro-batches/ranks.

    loss_sum = sum over learnable rows i of  logsumexp(logits_i) - logits_i[label_i]
    d loss_sum / d logits_i = softmax(logits_i) - onehot(label_i)      (0 for ignored rows)

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


class LossOutput(NamedTuple):
    loss_sum: Tensor  # fp32 scalar: sum of per-token cross-entropy over learnable positions
    n_tokens: Tensor  # int64 scalar: number of positions whose label != ignore_index
    n_correct: Tensor  # int64 scalar: learnable positions where argmax(logits) == label
    aux_loss: Tensor | float = 0.0  # fp32 scalar, a mean: router losses of mixture-of-experts models (else 0)


def _rows_per_chunk(logits: Tensor) -> int:
    # fp32 temporaries of 16 MiB on CPU: small enough for malloc to reuse them (no fresh pages each chunk);
    # 128 MiB on GPU, where fewer, larger chunks mean fewer kernel launches
    elements = 2**22 if logits.device.type == "cpu" else 2**25
    return max(1, elements // logits.shape[1])


class _ChunkedCrossEntropy(torch.autograd.Function):
    """(loss_sum, n_correct) for logits (N, V) of any float dtype and labels (N,); see the module docstring."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, reuse_logits: bool):
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
        loss_sum = row_loss.sum()
        n_correct = ((argmax == labels) & learnable).sum()
        ctx.save_for_backward(logits, target, learnable)
        ctx.reuse_logits = reuse_logits
        ctx.mark_non_differentiable(n_correct)
        return loss_sum, n_correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_n_correct: Tensor):
        # with reuse_logits, a second backward through the same graph fails autograd's version check right here
        logits, target, learnable = ctx.saved_tensors
        grad = logits if ctx.reuse_logits else torch.empty_like(logits)  # (N, V) in the logits' dtype
        scale = (grad_loss.float() * learnable)[:, None]  # (N, 1): d loss / d row_loss, 0 on ignored rows
        step = _rows_per_chunk(logits)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            g = torch.softmax(logits[rows].float(), dim=-1)  # (n, V) fp32
            g.mul_(scale[rows])
            g.scatter_add_(1, target[rows, None], -scale[rows])  # softmax - onehot(label), scaled
            grad[rows] = g
        return grad, None, None, None


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


def lm_loss_ref(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> LossOutput:
    """The same quantities with F.cross_entropy: the reference lm_loss is tested against."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
    flat_labels = labels.reshape(-1)  # (B*T,)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    learnable = flat_labels != ignore_index  # (B*T,)
    n_correct = ((flat_logits.detach().argmax(dim=-1) == flat_labels) & learnable).sum()
    return LossOutput(loss_sum, learnable.sum(), n_correct)


def lm_head_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, kernels: KernelConfig, softcap: float = 0.0,
                 ignore_index: int = -100) -> LossOutput:
    """The LossOutput of logits = softcap(head(hidden)) (B, T, V) against labels (B, T), by the path the kernel
    switches choose (see kernels.KernelConfig), all of them the same sums:

    - fused linear cross-entropy (default): chunk by chunk from the hidden states, never holding the (B, T, V)
      logits; each chunk's loss by the Triton kernel on CUDA, by PyTorch elsewhere;
    - else the full logits, then the Triton cross-entropy kernel (gradient written into the logits), or lm_loss.
    softcap > 0 caps the logits as cap * tanh(logits / cap) (Gemma2's final softcap) inside the loss.
    """
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
