"""Learning-rate schedule: linear warmup, then cosine / linear decay or constant.

A pure function of the step, so resuming needs only the step counter.
"""

from __future__ import annotations

import math

from locmoe_train.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step ``step`` (1-based: the first update uses ``lr_at(1)``)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        coeff = 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * coeff
