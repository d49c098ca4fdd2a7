"""The eager rotary embedding (rotate-half layout, see model/rope.py): the reference the Triton kernel in
kernels/rope.py is held to, and the eager path of the model itself (model.rope.apply_rope is this function).

It lives apart from kernels/rope.py because that file imports Triton, which CPU installs may lack, and the model
must import its eager path on every install.
"""

import torch
from torch import Tensor


def apply_rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, n_heads, D) by angles given as cos/sin (B, T, D/2); computed in fp32, returned in x.dtype.

    Pair j = (x1[j], x2[j]) of the halves (x1, x2) = (x[:D/2], x[D/2:]) becomes
    (x1 * cos - x2 * sin, x2 * cos + x1 * sin)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2)
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, n_heads, D/2) each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, T, n_heads, D)
    return out.to(x.dtype)
