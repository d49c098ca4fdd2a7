"""The one batch type every loader yields and every model takes: pretraining windows, packed SFT samples, padded
rows, multiple-choice continuations and GRPO completions alike.

    batch = Batch.from_windows(x, y)                 # pretraining: (B, T) windows, one document per row
    batch = Batch.packed(ids, labels, lengths)       # one row of samples laid end to end (data/packing.py)
    out = model(batch.to(device))                    # LossOutput: loss_sum, n_tokens, n_correct, aux_loss
    out = model(batch, reduction="none")             # ... plus token_losses (B, T), sample_losses and sample_tokens
                                                     #     (n_samples,): see model.loss.LossOutput
    trunk = model(batch, return_hidden=True)         # Trunk: final hidden states (B, T, dim), router aux loss

Fields (B rows of T tokens; labels are already aligned: labels[b, t] is the token that follows input_ids[b, t]):

    input_ids     (B, T) int64
    labels        (B, T) int64, -100 wherever nothing is learned (prompts, padding, a sample's last position)
    position_ids  (B, T) int64 restarting at 0 at every packed sample, or None (0..T-1 in every row)
    cu_seqlens    (n_samples + 1,) int32 offsets of the samples in the flattened B * T tokens, or None (every row
                  is one sample). Kept on the host by loaders: the model plans its attention from it once per
                  forward (model.attention.AttentionPlan) without reading a device tensor back
    max_seqlen    the longest sample, an int computed with cu_seqlens on the host (T when cu_seqlens is None); the
                  attention plan derives the kernels' own from the host offsets, where row starts also cut samples
    loss_weights  (B, T) float, multiplying each token's loss, or None (every learnable token weighs 1)
    targets       per-sample targets (n_samples,) or (n_samples, C) for heads other than the LM head, or None

A sample never attends across its boundary, and its last position's label is -100 whenever the next token belongs
to another sample: what a packed batch computes for each sample is what that sample alone computes.
"""

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor | None = None
    cu_seqlens: Tensor | None = None
    max_seqlen: int = 0
    loss_weights: Tensor | None = None
    targets: Tensor | None = None

    def __post_init__(self):
        if self.input_ids.dim() != 2 or self.labels.shape != self.input_ids.shape:
            raise ValueError(f"Batch: input_ids and labels must both be (B, T); got {tuple(self.input_ids.shape)} "
                             f"and {tuple(self.labels.shape)}")
        for name in ("position_ids", "loss_weights"):
            t = getattr(self, name)
            if t is not None and t.shape != self.input_ids.shape:
                raise ValueError(f"Batch: {name} {tuple(t.shape)} must match input_ids {tuple(self.input_ids.shape)}")
        if self.cu_seqlens is not None and self.position_ids is None:
            raise ValueError("Batch: packed samples (cu_seqlens) need position_ids that restart at every sample")
        if not self.max_seqlen:
            object.__setattr__(self, "max_seqlen", self.input_ids.shape[1] if self.cu_seqlens is None
                               else int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max()))

    @classmethod
    def from_windows(cls, x: Tensor, y: Tensor) -> "Batch":
        """Rows that are each one sequence (pretraining windows): no packing, default positions."""
        return cls(x, y)

    @classmethod
    def packed(cls, input_ids: Tensor, labels: Tensor, lengths: list[int],
               loss_weights: Tensor | None = None, targets: Tensor | None = None) -> "Batch":
        """One row (1, T) of samples of the given lengths laid end to end (sum(lengths) == T): cu_seqlens,
        restarting positions and max_seqlen from the lengths, on the host."""
        if sum(lengths) != input_ids.shape[-1] or input_ids.shape[0] != 1:
            raise ValueError(f"Batch.packed: lengths sum to {sum(lengths)} but input_ids is {tuple(input_ids.shape)}; "
                             f"expected one row of exactly that many tokens")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
        positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths])[None]  # (1, T)
        return cls(input_ids, labels, positions, cu, max(lengths), loss_weights, targets)

    @property
    def n_samples(self) -> int:
        return self.input_ids.shape[0] if self.cu_seqlens is None else len(self.cu_seqlens) - 1

    def n_learnable(self) -> int:
        """Positions whose label is learned (label != -100)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        """The tensors on `device`, except cu_seqlens, which stays where it is (the host) for planning."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor) and name != "cu_seqlens":
                moved[name] = value.to(device, non_blocking=non_blocking)
        return replace(self, **moved)
