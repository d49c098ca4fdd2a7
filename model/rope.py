"""Rotary position embeddings (Su et al., 2021, RoFormer) in the "rotate-half" layout of Hugging Face checkpoints.

A head vector x of size D is split into halves (x1, x2) = (x[:D/2], x[D/2:]); pair j = (x1[j], x2[j]) is rotated by
the angle position * inv_freq[j]:

    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin

which equals HF's `x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)` element by element. (Meta's original
checkpoints interleave the pairs instead: (x[0], x[1]), (x[2], x[3]), ...; HF's conversion script permutes the q/k
rows so that rotate-half applies, and so do we by loading HF checkpoints.)

Angles come from per-token position ids, so packed sequences whose positions restart at every document work.
"""

import math

import torch
from torch import Tensor


def rope_inv_freq(
    head_dim: int,
    theta: float = 10000.0,
    scaling: str = "none",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_seq_len: int = 8192,
    device: torch.device | str | None = None,
) -> Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32, computed as Hugging Face's rope utils compute them.

    scaling="none":   inv_freq[j] = theta ** (-2j / head_dim)
    scaling="linear": inv_freq / factor (position interpolation, Chen et al. 2023: positions squeezed by `factor`)
    scaling="llama3": Llama 3.1's frequency-dependent interpolation. With wavelength w = 2*pi / inv_freq and
        L = original_max_seq_len: w < L / high_freq_factor keeps inv_freq (high frequencies: local order);
        w > L / low_freq_factor divides it by `factor` (low frequencies: long range); in between it blends
        (1 - s) * inv_freq / factor + s * inv_freq, with s = (L / w - low_freq_factor) / (high - low).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim  # (D/2,)
    inv_freq = 1.0 / (theta**exponents)  # (D/2,)
    if scaling == "none":
        return inv_freq
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "llama3":
        low_freq_wavelen = original_max_seq_len / low_freq_factor
        high_freq_wavelen = original_max_seq_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq  # (D/2,)
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # (D/2,)
        smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled  # (D/2,)
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)  # (D/2,)
        return torch.where(is_medium, blended, scaled)
    raise ValueError(f"unknown rope scaling type {scaling!r}; expected 'none', 'linear' or 'llama3'")


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, fp32, each (B, T, D/2) for position_ids (B, T) (B may be 1)."""
    angles = position_ids[..., None].float() * inv_freq.float()  # (B, T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, n_heads, D) by angles given as cos/sin (B, T, D/2); computed in fp32, returned in x.dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2)
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, n_heads, D/2) each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, T, n_heads, D)
    return out.to(x.dtype)
