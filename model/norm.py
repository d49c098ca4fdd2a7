"""RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight, normalised in fp32."""

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension. The statistics and the division always run in fp32.

    Families differ only in how the learned scale is applied, which matters in bf16 (in fp32 they agree):
        Llama, Qwen2, GraniteMoE:  weight * normed.to(x.dtype)              (cast, then scale)
        GPT-OSS (scale_in_fp32):   (weight * normed).to(x.dtype)            (scale in fp32, then cast)
        Gemma2 (unit_offset):      (normed * (1 + weight)).to(x.dtype)      weight starts at 0, scale in fp32
    """

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False, scale_in_fp32: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.scale_in_fp32 = scale_in_fp32 or unit_offset
        self.weight = nn.Parameter(torch.empty(dim))  # (dim,) filled by reset_parameters() / init_weights()

    def reset_parameters(self) -> None:
        """ones (zeros with unit_offset, where the scale is 1 + weight)."""
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # (..., dim)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., dim)
        if not self.scale_in_fp32:
            return self.weight * x32.to(x.dtype)
        scale = 1.0 + self.weight.float() if self.unit_offset else self.weight.float()
        return (x32 * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", unit_offset" if self.unit_offset else "")
