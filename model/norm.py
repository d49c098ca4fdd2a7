"""RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight, normalised in fp32."""

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension.

    The statistics and the division run in fp32 whatever the input dtype; the result is cast back to the
    input dtype before the (learned, ones-initialised) scale is applied, as Hugging Face Llama does.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))  # (dim,) filled by reset_parameters() / init_weights()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # (..., dim)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., dim)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
