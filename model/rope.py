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
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.rope_ref import apply_rope_ref

# The eager rotation of x (B, T, n_heads, D) by cos/sin (B, T, D/2), in fp32, returned in x.dtype. It is defined
# with the Triton kernel it is the reference of (kernels/rope_ref.py, beside kernels/rope.py), so both share one copy.
apply_rope = apply_rope_ref

ROPE_SCALING_TYPES = ("none", "linear", "llama3", "yarn")


@dataclass
class RopeScaling:
    type: str = "none"  # RoPE frequency scaling: "none" | "linear" | "llama3" | "yarn" (see model.rope.rope_inv_freq)
    factor: float = 1.0  # context extension factor: frequencies divided by it (linear; llama3's low band; yarn's interpolated band)
    low_freq_factor: float = 1.0  # llama3 only: wavelengths above original_max_seq_len / this are fully scaled
    high_freq_factor: float = 4.0  # llama3 only: wavelengths below original_max_seq_len / this are kept
    original_max_seq_len: int = 8192  # llama3 and yarn: context length the model was pretrained with
    beta_fast: float = 32.0  # yarn only: dimensions turning more than this many times over the original context are kept
    beta_slow: float = 1.0  # yarn only: dimensions turning fewer times than this are fully interpolated
    truncate: bool = True  # yarn only: round the ramp's ends to whole dimensions (GPT-OSS: false)
    attention_factor: float = 0.0  # yarn only: cos/sin multiplier; 0 = 0.1 * ln(factor) + 1 (YaRN's mscale)

    def cos_sin_scale(self) -> float:
        """The factor YaRN applies to cos and sin (1 for the other types)."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0

    def validate(self) -> None:
        """Raise ValueError naming the first field outside its range (only the fields of this type are read)."""
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling.type {self.type!r} unknown; expected one of {ROPE_SCALING_TYPES}")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"rope_scaling.{name} must be a finite number, got {getattr(self, name)}")
        positive = {"none": (), "linear": ("factor",), "yarn": ("factor", "original_max_seq_len", "beta_slow"),
                    "llama3": ("factor", "original_max_seq_len", "low_freq_factor")}[self.type]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"rope_scaling.{name} must be positive, got {getattr(self, name)}")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling: high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
                             f"({self.low_freq_factor})")
        if self.type == "yarn" and self.beta_fast < self.beta_slow:
            raise ValueError(f"rope_scaling: beta_fast ({self.beta_fast}) must be >= beta_slow ({self.beta_slow})")
        if self.type == "yarn" and self.attention_factor < 0:
            raise ValueError(f"rope_scaling.attention_factor must be >= 0 (0 = 0.1 ln(factor) + 1), got "
                             f"{self.attention_factor}")


def rope_scaling_from_hf(hf_config: dict) -> tuple[float, RopeScaling]:
    """rope theta and scaling from either config.json format: transformers >= 5 writes `rope_parameters`
    {rope_type, rope_theta, ...}; older files have top-level `rope_theta` and `rope_scaling` {rope_type|type, ...}."""
    params = dict(hf_config.get("rope_scaling") or {})
    params.update(hf_config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    original = int(params.get("original_max_position_embeddings", hf_config.get("max_position_embeddings", 8192)))
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling("llama3", factor=float(params["factor"]),
                                  low_freq_factor=float(params["low_freq_factor"]),
                                  high_freq_factor=float(params["high_freq_factor"]), original_max_seq_len=original)
    if kind == "yarn":
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise ValueError("HF config: yarn with mscale / mscale_all_dim (DeepSeek) is not supported")
        return theta, RopeScaling("yarn", factor=float(params["factor"]), original_max_seq_len=original,
                                  beta_fast=float(params.get("beta_fast") or 32.0),
                                  beta_slow=float(params.get("beta_slow") or 1.0),
                                  truncate=bool(params.get("truncate", True)),
                                  attention_factor=float(params.get("attention_factor") or 0.0))
    raise ValueError(f"HF config: rope type {kind!r} is not supported (supported: default, linear, llama3, yarn)")


def rope_scaling_to_hf(s: RopeScaling) -> dict | None:
    """The HF `rope_scaling` dict of a RopeScaling (None for plain RoPE): the inverse of rope_scaling_from_hf."""
    if s.type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    if s.type == "llama3":
        return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len}
    if s.type == "yarn":
        out = {"rope_type": "yarn", "factor": s.factor, "beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
               "truncate": s.truncate, "original_max_position_embeddings": s.original_max_seq_len}
        if s.attention_factor:
            out["attention_factor"] = s.attention_factor
        return out
    return None


def rope_inv_freq_for(head_dim: int, theta: float, s: RopeScaling, device=None) -> Tensor:
    """rope_inv_freq with the fields of a RopeScaling."""
    return rope_inv_freq(head_dim, theta, s.type, s.factor, s.low_freq_factor, s.high_freq_factor,
                         s.original_max_seq_len, device=device, beta_fast=s.beta_fast, beta_slow=s.beta_slow,
                         truncate=s.truncate)


def rope_inv_freq(
    head_dim: int,
    theta: float = 10000.0,
    scaling: str = "none",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_seq_len: int = 8192,
    device: torch.device | str | None = None,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32, computed as Hugging Face's rope utils compute them.

    scaling="none":   inv_freq[j] = theta ** (-2j / head_dim)
    scaling="linear": inv_freq / factor (position interpolation, Chen et al. 2023: positions squeezed by `factor`)
    scaling="llama3": Llama 3.1's frequency-dependent interpolation. With wavelength w = 2*pi / inv_freq and
        L = original_max_seq_len: w < L / high_freq_factor keeps inv_freq (high frequencies: local order);
        w > L / low_freq_factor divides it by `factor` (low frequencies: long range); in between it blends
        (1 - s) * inv_freq / factor + s * inv_freq, with s = (L / w - low_freq_factor) / (high - low).
    scaling="yarn": YaRN (Peng et al. 2023, "NTK-by-parts"). Dimension pair j turns L * inv_freq[j] / (2 pi) times
        over the original context L. Pairs turning more than beta_fast times keep inv_freq (extrapolation), pairs
        turning fewer than beta_slow times get inv_freq / factor (interpolation), and a linear ramp over the pair
        index blends between them: the ramp runs from d(beta_fast) to d(beta_slow), where
        d(r) = head_dim * ln(L / (2 pi r)) / (2 ln theta) is the pair that turns r times (rounded outwards when
        truncate). cos and sin are also multiplied by RopeScaling.cos_sin_scale() (0.1 ln(factor) + 1).
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
    if scaling == "yarn":
        def pair_turning(r: float) -> float:
            return head_dim * math.log(original_max_seq_len / (r * 2 * math.pi)) / (2 * math.log(theta))

        low, high = pair_turning(beta_fast), pair_turning(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # avoid dividing by zero
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # (D/2,) 1 = extrapolate (keep inv_freq), 0 = interpolate (inv_freq / factor)
        return inv_freq / factor * (1 - keep) + inv_freq * keep
    raise ValueError(f"unknown rope scaling type {scaling!r}; expected one of {ROPE_SCALING_TYPES}")


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles (times `scale`, YaRN's attention factor), fp32, each (B, T, D/2) for
    position_ids (B, T) (B may be 1)."""
    angles = position_ids[..., None].float() * inv_freq.float()  # (B, T, D/2)
    if scale != 1.0:
        return angles.cos() * scale, angles.sin() * scale
    return angles.cos(), angles.sin()

