"""model/mxfp4.py and the MXFP4 pairs in model/weights.py: quantise/dequantise, transformers' dequantiser as the
oracle, and loading a checkpoint that holds `X_blocks` + `X_scales` (and Transforms) through load_safetensors.

Tolerances: none to state but exactness. Every FP4 value times a power of two is exact in bf16 and fp32, so
dequantised tensors are compared bit for bit (as integers, so -0.0 and +0.0 differ), a grid value times a power
of two must survive quantize -> dequantize exactly, and other values must land within half an FP4 grid step
(times the block's scale) of where they started, computed in float64.
"""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from model import mxfp4
from model.mxfp4 import dense_shape, dequantize, mxfp4_to_dense, quantize
from model.weights import CheckpointReader, Transform, WeightMismatchError, load_safetensors

E, OUT, IN = 3, 64, 96  # G = IN / 32 = 3 blocks per row
GRID = torch.tensor(mxfp4.FP4_VALUES)  # (16,)
BITS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype])


def random_weights(seed=0) -> torch.Tensor:
    """(E, OUT, IN) normal values with each row on its own scale (2^-6 .. 2^5), so the scales differ."""
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.exp2(torch.randint(-6, 6, (E, OUT, 1), generator=g).float())
    return torch.randn(E, OUT, IN, generator=g) * row_scale


def test_fp4_table_is_e2m1():
    """Code c: bit 3 the sign, bits 0-2 E2M1 (exponent bias 1, one mantissa bit, code 1 the subnormal 0.5)."""
    for code in range(16):
        e, m, sign = (code >> 1) & 3, code & 1, -1.0 if code & 8 else 1.0
        value = sign * (m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1))
        stored = mxfp4.FP4_VALUES[code]
        assert stored == value and math.copysign(1.0, stored) == math.copysign(1.0, value), code  # -0.0 for code 8


def test_round_trip_exact_on_grid_times_power_of_two():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (E, OUT, IN), generator=g)
    exponents = torch.randint(-20, 20, (E, OUT, IN // 32, 1), generator=g).float()  # one per block
    w = (GRID[codes].reshape(E, OUT, IN // 32, 32) * torch.exp2(exponents)).reshape(E, OUT, IN)
    w[0, 0, :32] = 0.0  # an all-zero block
    w[0, 1, :32] = GRID[codes[0, 1, :32] % 8] * 2.0**-3  # a block of small magnitudes only (max < 6 * 2^-3)
    blocks, scales = quantize(w)
    assert blocks.dtype == scales.dtype == torch.uint8
    assert blocks.shape == (E, OUT, IN // 32, 16) and scales.shape == (E, OUT, IN // 32)
    for dtype in (torch.float32, torch.bfloat16):
        back = dequantize(blocks, scales, dtype)
        assert back.dtype == dtype and back.shape == w.shape
        assert torch.equal(back.float(), w)  # value equality (the quantiser maps -0.0 to +0.0)


def test_round_trip_within_half_a_grid_step():
    w = random_weights()
    blocks, scales = quantize(w)
    back = dequantize(blocks, scales, torch.float32).double()
    scale = torch.exp2(scales.double() - mxfp4.SCALE_BIAS).repeat_interleave(32, dim=-1)  # (E, OUT, IN)
    scaled = w.double().abs() / scale
    # the smallest power of two that fits: every block max in (3, 6] once scaled (a scale half as big would not fit)
    block_max = scaled.reshape(E, OUT, IN // 32, 32).amax(dim=-1)
    assert (block_max <= 6).all() and (block_max > 3).all()
    step = torch.where(scaled <= 2, 0.5, torch.where(scaled <= 4, 1.0, 2.0))  # FP4 grid spacing at |w| / scale
    err = (back - w.double()).abs()
    assert (err <= step / 2 * scale).all()
    assert err.max() > 0  # random values are not on the grid: the check above is not vacuous
    assert torch.equal(torch.sign(back)[back != 0], torch.sign(w.double())[back != 0])


def test_quantize_rounds_to_nearest_ties_to_smaller_magnitude():
    w = torch.zeros(32)
    w[:10] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, -0.3])  # max 6: scale 2^0
    blocks, scales = quantize(w)
    assert scales.tolist() == [mxfp4.SCALE_BIAS]
    back = dequantize(blocks, scales, torch.float32)
    assert back[:10].tolist() == [6.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -2.0, -0.5]
    assert back[0] == 6.0 and blocks[0, 0].item() & 0x0F == 7  # low nibble first: element 0 is code 7 (+6)
    with pytest.raises(ValueError, match="multiple of 32, got 40"):
        quantize(torch.zeros(2, 40))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_matches_transformers_on_our_quantiser(dtype):
    blocks, scales = quantize(random_weights())
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (E, IN, OUT)
    ours = mxfp4_to_dense(blocks, scales, dtype)
    assert ours.shape == theirs.shape == (E, IN, OUT) and ours.dtype == theirs.dtype == dtype
    assert torch.equal(bits(ours), bits(theirs))
    assert torch.equal(bits(dequantize(blocks, scales, dtype)), bits(theirs.transpose(1, 2).contiguous()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_matches_transformers_on_random_bytes(dtype):
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (E, OUT, IN // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 135, (E, OUT, IN // 32), dtype=torch.uint8, generator=g)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    ours = mxfp4_to_dense(blocks, scales, dtype)
    assert torch.equal(bits(ours), bits(theirs))
    assert (bits(ours) == bits(torch.tensor(-0.0, dtype=dtype))).any()  # code 8 (-0) was drawn and kept its sign


def test_dense_shape_validation():
    assert dense_shape((E, OUT, 3, 16), (E, OUT, 3)) == (E, IN, OUT)
    assert dense_shape((OUT, 3, 16), (OUT, 3)) == (IN, OUT)
    with pytest.raises(ValueError, match=r"MXFP4 w_scales has shape \[3, 64, 2\].*needs one scale per block of 32: "
                                         r"\[3, 64, 3\]"):
        dense_shape((E, OUT, 3, 16), (E, OUT, 2), "w")
    with pytest.raises(ValueError, match=r"MXFP4 w_blocks has shape \[3, 64, 3, 8\]"):
        dense_shape((E, OUT, 3, 8), (E, OUT, 3), "w")
    with pytest.raises(ValueError, match=r"MXFP4 w_blocks has shape \[3, 16\]"):
        dense_shape((3, 16), (3,), "w")
    with pytest.raises(ValueError, match=r"tensor_scales has shape \[3, 64, 4\]"):  # checked here too, unnamed
        mxfp4_to_dense(torch.zeros(E, OUT, 3, 16, dtype=torch.uint8), torch.zeros(E, OUT, 4, dtype=torch.uint8))


# --- CheckpointReader / load_safetensors with MXFP4 pairs ---------------------------------------------------

class Tiny(nn.Module):
    """Parameters x.w (an MXFP4 pair in the checkpoint) and x.b (a plain tensor)."""

    def __init__(self, w_shape=(E, IN, OUT), b_shape=(5, 7), dtype=torch.float32):
        super().__init__()
        self.x = nn.Module()
        self.x.w = nn.Parameter(torch.full(w_shape, float("nan"), dtype=dtype))  # poisoned: unwritten fails
        self.x.b = nn.Parameter(torch.full(b_shape, float("nan"), dtype=dtype))


def write_checkpoint(path, blocks, scales=None, plain=None):
    tensors = {"x.w_blocks": blocks}
    if scales is not None:
        tensors["x.w_scales"] = scales
    tensors["x.b"] = plain if plain is not None else torch.arange(35.0).reshape(5, 7)
    save_file(tensors, str(path))
    return str(path)


@pytest.fixture
def quantized():
    return quantize(random_weights())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_mxfp4_pair_into_dense_parameter(tmp_path, quantized, dtype):
    blocks, scales = quantized
    path = write_checkpoint(tmp_path / "m.safetensors", blocks, scales)
    reader = CheckpointReader([path])
    assert reader.shapes == {"x.w": (E, IN, OUT), "x.b": (5, 7)}  # the pair is one tensor; no _scales entry
    assert torch.equal(bits(reader.get("x.w", torch.float32)), bits(mxfp4_to_dense(blocks, scales, torch.float32)))
    assert reader.get("x.w").dtype == torch.bfloat16  # dequantised to bf16 when no dtype is asked for
    reader.close()

    model = Tiny(dtype=dtype)
    load_safetensors(model, [path])
    assert torch.equal(bits(model.x.w.data), bits(mxfp4_to_dense(blocks, scales, dtype)))
    assert torch.equal(model.x.b.data, torch.arange(35.0).reshape(5, 7).to(dtype))


def test_wrong_scale_shape_names_tensor_and_expected_shape(tmp_path, quantized):
    blocks, scales = quantized
    path = write_checkpoint(tmp_path / "m.safetensors", blocks, scales[:, :-1].contiguous())  # (E, OUT - 1, 3)
    message = r"MXFP4 x.w_scales has shape \[3, 63, 3\] but x.w_blocks \[3, 64, 3, 16\] .*: \[3, 64, 3\]"
    with pytest.raises(ValueError, match=message) as info:
        load_safetensors(Tiny(), [path])
    assert not isinstance(info.value, WeightMismatchError)
    with pytest.raises(ValueError, match=message):
        CheckpointReader([path])


def test_blocks_without_scales_names_the_missing_tensor(tmp_path, quantized):
    blocks, _ = quantized
    path = write_checkpoint(tmp_path / "m.safetensors", blocks)
    with pytest.raises(ValueError, match="MXFP4 tensor x.w_blocks has no x.w_scales beside it"):
        load_safetensors(Tiny(), [path])


def test_transform_is_applied_and_its_shape_checked(tmp_path, quantized):
    blocks, scales = quantized
    path = write_checkpoint(tmp_path / "m.safetensors", blocks, scales)
    transpose = Transform(shape=lambda s: (*s[:-2], s[-1], s[-2]), load=lambda t: t.transpose(-2, -1),
                          export=lambda t: t.transpose(-2, -1))

    # x.w held in the stored (E, out, in) layout, x.b transposed to (7, 5)
    model = Tiny(w_shape=(E, OUT, IN), b_shape=(7, 5))
    load_safetensors(model, [path], transforms={"x.w": transpose, "x.b": transpose})
    assert torch.equal(model.x.w.data, dequantize(blocks, scales, torch.float32))
    assert torch.equal(model.x.b.data, torch.arange(35.0).reshape(5, 7).T)

    # the transformed shape is the one checked: a model expecting the untransformed shape is reported
    with pytest.raises(WeightMismatchError) as info:
        load_safetensors(Tiny(), [path], transforms={"x.w": transpose})
    assert info.value.mismatched == [("x.w", (E, OUT, IN), (E, IN, OUT))]
    assert info.value.missing == [] and info.value.unexpected == []
    assert "x.w: checkpoint [3, 64, 96] vs model [3, 96, 64]" in str(info.value)


def test_transform_pattern_with_layer_index(tmp_path):
    pairs = [quantize(random_weights(seed=i)) for i in range(2)]  # different weights per layer
    tensors = {}
    for i, (blocks, scales) in enumerate(pairs):
        tensors[f"layers.{i}.w_blocks"], tensors[f"layers.{i}.w_scales"] = blocks, scales
    save_file(tensors, str(tmp_path / "m.safetensors"))
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Module() for _ in range(2))
    for layer in model.layers:
        layer.w = nn.Parameter(torch.full((E, OUT, IN), float("nan")))
    transpose = Transform(shape=lambda s: (s[0], s[2], s[1]), load=lambda t: t.transpose(1, 2),
                          export=lambda t: t.transpose(1, 2))
    load_safetensors(model, [str(tmp_path / "m.safetensors")], transforms={"layers.{i}.w": transpose})
    for layer, (blocks, scales) in zip(model.layers, pairs):
        assert torch.equal(layer.w.data, dequantize(blocks, scales, torch.float32))
