"""Triton kernels. Each file holds one kernel family in the same shape: the @triton.jit kernel(s), the host
forward/backward that launch them, one torch.autograd.Function, and an eager PyTorch `*_ref` beside it that the
tests hold the kernel to.

    rope.py                        rotary embedding of q and k in one launch, forward and backward
    cross_entropy.py               loss and gradient in one pass over each row of logits
    fused_linear_cross_entropy.py  the loss from hidden states and the output head, never holding all the logits

Triton is imported only by the kernel files themselves, so installs without Triton (CPU machines) import the
model code freely. This module holds what the model needs to choose a path (KernelConfig, the `kernels` field of
every family's config) and the loss-row check that the kernels and the PyTorch chunks share.
"""

import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import Tensor

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton itself reads it at import


@dataclass
class KernelConfig:
    """The model's fast paths. Each Triton kernel runs on CUDA tensors (and, with interpret, on CPU tensors under
    Triton's interpreter); elsewhere, or switched off, the eager PyTorch path runs. Every path is tested against
    the eager one."""

    enabled: bool = True  # master switch: false = every path eager PyTorch (full logits, F-style loss, eager RoPE)
    rope: bool = True  # Triton RoPE, q and k in one launch (kernels.rope)
    cross_entropy: bool = True  # Triton cross-entropy, loss and gradient in one pass per row (kernels.cross_entropy)
    fused_linear_cross_entropy: bool = True  # loss from hidden states, never the full logits (all devices)
    interpret: bool = False  # also run the Triton kernels on CPU tensors, through TRITON_INTERPRET=1 (slow: tests)

    def use(self, name: str, t: Tensor) -> bool:
        """Whether the Triton kernel `name` ("rope" or "cross_entropy") runs for tensor t."""
        if not (self.enabled and getattr(self, name)):
            return False
        if t.device.type == "cpu" and self.interpret:
            if not (HAS_TRITON and INTERPRET):
                raise RuntimeError("kernels.interpret=True runs Triton kernels on CPU through Triton's interpreter: "
                                   "install triton and start the process with TRITON_INTERPRET=1")
            return True
        return t.is_cuda and HAS_TRITON

    def fused_loss(self) -> bool:
        """Whether the loss is computed from the hidden states, chunk by chunk (on every device)."""
        return self.enabled and self.fused_linear_cross_entropy


def check_loss_rows(loss_rows: Tensor, labels: Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Raise ValueError if a learnable label lies outside [0, V) (bad input: it names the row and the label).

    Every loss path gives such a row a NaN loss instead of reading out of bounds, so the check costs one host sync
    only when all is well. A row whose logits hold inf or NaN passes: its loss is inf or NaN, which is divergence,
    not bad input, and the caller decides (train.py's on_nan stops or skips the step). A -inf logit off the label (a
    masked vocabulary entry) even gives a finite loss, except under label smoothing, which sums every logit; under
    a softcap, +-inf logits are capped to +-c.
    """
    if bool(torch.isfinite(loss_rows).all()):
        return
    labels = labels.reshape(-1)
    bad_label = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))  # (N,)
    if bool(bad_label.any()):
        rows = bad_label.nonzero().flatten()
        i = int(rows[0])
        raise ValueError(f"label {int(labels[i])} at row {i} (of {len(rows)} such rows) is outside [0, {vocab_size}) "
                         f"and is not ignore_index={ignore_index}: fix the labels, or mark positions that should not "
                         f"count with ignore_index")
