"""MXFP4 (OCP Microscaling, 4-bit floats): the expert weights of GPT-OSS checkpoints, dequantised as they load.

A row of `in` values is cut into blocks of 32. Each block stores 32 FP4 (E2M1) codes, two per byte, low nibble
first, and one shared power-of-two scale as a biased exponent byte:

    blocks (..., G, 16) uint8      G = in / 32 groups, 16 bytes = 32 codes
    scales (..., G)     uint8      value = FP4[code] * 2 ** (scale - 127)
    FP4[0..15] = +0 .5 1 1.5 2 3 4 6, -0 -.5 -1 -1.5 -2 -3 -4 -6       (bit 3 = sign, bits 0-2 = E2M1)

In OpenAI's checkpoints the quantised tensors are stored with the output features as rows, `name_blocks`
(E, out, in / 32, 16), the transpose of the unquantised HF parameter `name` (E, in, out); mxfp4_to_dense returns
that unquantised layout, so a family's key map and transforms see one tensor whichever way it was stored.
Every FP4 value times a power of two is exact in bfloat16, so dequantising straight to bf16 loses nothing.
"""

import torch
from torch import Tensor

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
SCALE_BIAS = 127
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def dense_shape(blocks_shape: tuple, scales_shape: tuple, name: str = "tensor") -> tuple:
    """The unquantised (..., in, out) shape of an MXFP4 pair, after checking the two shapes agree."""
    if len(blocks_shape) < 3 or blocks_shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 {name}{BLOCKS_SUFFIX} has shape {list(blocks_shape)}; expected "
                         f"(..., out, in / {BLOCK}, {BLOCK // 2}) uint8")
    if tuple(scales_shape) != tuple(blocks_shape[:-1]):
        raise ValueError(f"MXFP4 {name}{SCALES_SUFFIX} has shape {list(scales_shape)} but {name}{BLOCKS_SUFFIX} "
                         f"{list(blocks_shape)} needs one scale per block of {BLOCK}: {list(blocks_shape[:-1])}. "
                         f"The checkpoint is damaged or was written by an incompatible quantiser")
    *lead, out, groups, _ = blocks_shape
    return (*lead, groups * BLOCK, out)


def dequantize(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """blocks (..., G, 16) uint8 and scales (..., G) uint8 -> values (..., G * 32) in dtype, stored order."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()  # (..., G, 32) low nibble first
    values = lut[codes]  # (..., G, 32)
    values = torch.ldexp(values, (scales.to(torch.int32) - SCALE_BIAS)[..., None].to(dtype))
    return values.flatten(-2)  # (..., G * 32)


def mxfp4_to_dense(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16,
                   name: str = "tensor") -> Tensor:
    """An MXFP4 pair (E, out, G, 16), (E, out, G) -> the unquantised parameter (E, in, out) in dtype."""
    dense_shape(tuple(blocks.shape), tuple(scales.shape), name)
    return dequantize(blocks, scales, dtype).transpose(-2, -1).contiguous()


def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """Round w (..., in) (in a multiple of 32) to MXFP4: blocks (..., in / 32, 16) uint8, scales (..., in / 32).

    Per block the scale is the smallest power of two 2^e with max|w| / 2^e <= 6 (the largest FP4 magnitude),
    and each value goes to the nearest FP4 code (ties to the smaller magnitude). Used to build test fixtures
    and to export; `dequantize(quantize(w))` is within half an FP4 step of w.
    """
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK}, got {w.shape[-1]}")
    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)  # (..., G, 32)
    amax = groups.abs().amax(dim=-1)  # (..., G)
    exponent = torch.ceil(torch.log2(amax.clamp_min(2.0**-126) / 6.0)).clamp(-SCALE_BIAS, 127)  # (..., G)
    scaled = groups / torch.exp2(exponent)[..., None]  # (..., G, 32), |x| <= 6
    magnitudes = torch.tensor(FP4_VALUES[:8])  # (8,)
    code = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)  # (..., G, 32) nearest magnitude, 0..7
    code = code + 8 * (scaled < 0)  # sign bit
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)  # (..., G, 16) low nibble = even element
    scales = (exponent + SCALE_BIAS).to(torch.uint8)  # (..., G)
    return blocks, scales
