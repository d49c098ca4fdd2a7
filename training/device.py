"""Device and numeric precision choices shared by train.py, eval.py and generate.py."""

import contextlib

import torch


def pick_device(name: str) -> torch.device:
    """auto = the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device={name!r} but CUDA is not available; use --device=cpu")
    return torch.device(name)


def autocast_context(dtype: str, device: torch.device):
    """bf16 autocast on CUDA by default; fp32 on CPU unless bf16 is asked for."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
