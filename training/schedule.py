"""Learning-rate schedules: a pure function of the step, so resuming needs only the step number.

    cosine    linear warm-up 0 -> lr over warmup_steps, then cosine down to lr * min_lr_ratio at max_steps
    onecycle  cosine rise lr/div_factor -> lr over warmup_steps, then cosine down to lr * min_lr_ratio
              (Smith & Topin, "Super-Convergence", 2017: a short climb to a high peak)
    wsd       warm-up, a constant lr, then a decay over the last decay_fraction of steps to lr * min_lr_ratio,
              linear or 1-sqrt (Hu et al., MiniCPM, 2024; Hagele et al., "Scaling Laws and Compute-Optimal
              Training Beyond Fixed Training Durations", 2024)
    constant  linear warm-up, then lr
"""

import math

from training.config import ScheduleConfig


def _cosine(frac: float) -> float:
    """1 -> 0 along half a cosine as frac goes 0 -> 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def lr_at(step: int, lr: float, max_steps: int, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    min_lr = lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max_steps)
    if cfg.name == "onecycle":
        start = lr / cfg.div_factor
        if step < warmup:
            return lr + (start - lr) * _cosine(step / warmup)
        return min_lr + (lr - min_lr) * _cosine((step - warmup) / max(1, max_steps - 1 - warmup))
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.name == "constant":
        return lr
    if cfg.name == "cosine":
        return min_lr + (lr - min_lr) * _cosine((step - warmup) / max(1, max_steps - 1 - warmup))
    if cfg.name == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        decay_start = max(warmup, max_steps - decay_steps)
        if step < decay_start:
            return lr
        frac = min(1.0, (step - decay_start) / max(1, max_steps - 1 - decay_start))
        drop = frac if cfg.decay_shape == "linear" else math.sqrt(frac)
        return lr - (lr - min_lr) * drop
    raise ValueError(f"unknown schedule {cfg.name!r}; use cosine, onecycle, wsd or constant")
