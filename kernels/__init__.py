"""Triton kernels. Each file holds one kernel family in the same shape: the @triton.jit kernel(s), the host
forward/backward that launch them, one torch.autograd.Function, and an eager PyTorch `*_ref` beside it that the
tests hold the kernel to.

Triton is imported only by the kernel files themselves, so CPU installs without Triton import model code freely;
`triton_usable(t)` tells the model whether a kernel can run on tensor t: natively on CUDA, or on CPU under
TRITON_INTERPRET=1 (Triton's interpreter, which the tests use on machines without a GPU).
"""

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on t's device: CUDA with Triton installed, or CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")
