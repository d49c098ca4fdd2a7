"""LR schedules: their values at the landmarks that define them."""

import math

import pytest

from training.config import ScheduleConfig
from training.schedule import lr_at

LR, STEPS = 1e-3, 100


def curve(**kw):
    cfg = ScheduleConfig(**kw)
    return [lr_at(s, LR, STEPS, cfg) for s in range(STEPS)]


def test_cosine_warmup_then_decay_to_min():
    lrs = curve(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(LR / 10) and lrs[9] == pytest.approx(LR)
    assert lrs[-1] == pytest.approx(0.1 * LR)
    assert lrs[10 + 45] == pytest.approx(0.1 * LR + 0.9 * LR * 0.5 * (1 + math.cos(math.pi * 45 / 89)))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_onecycle_rises_from_lr_over_div_factor():
    lrs = curve(name="onecycle", warmup_steps=20, div_factor=25.0, min_lr_ratio=1e-3)
    assert lrs[0] == pytest.approx(LR / 25)
    assert lrs[20] == pytest.approx(LR)
    assert lrs[10] == pytest.approx((LR + LR / 25) / 2)  # half-way up a cosine ramp
    assert lrs[-1] == pytest.approx(1e-3 * LR)
    assert max(lrs) == pytest.approx(LR)


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_wsd_plateau_then_decay(shape):
    lrs = curve(name="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0, decay_shape=shape)
    assert all(v == pytest.approx(LR) for v in lrs[9:80])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    frac = (90 - 80) / 19
    expected = LR * (1 - (frac if shape == "linear" else math.sqrt(frac)))
    assert lrs[90] == pytest.approx(expected)


def test_constant_after_warmup():
    lrs = curve(name="constant", warmup_steps=4)
    assert lrs[:4] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR]) and set(lrs[3:]) == {LR}
