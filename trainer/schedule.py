"""Learning-rate schedules: pure functions of the step."""

from __future__ import annotations

import math

from trainer.config import OptimConfig


def learning_rate(step: int, total_steps: int, optim: OptimConfig) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of `total_steps`.

    All schedules warm up linearly from lr/warmup to lr. Then `cosine` decays to min_lr at
    the last step; `wsd` (warmup-stable-decay) holds lr and decays linearly to min_lr over
    the final `decay_fraction` of the steps, which suits open-ended pre-training because the
    stable phase can be extended; `constant` holds lr.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "cosine":
        span = max(1, total_steps - 1 - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(optim.decay_fraction * total_steps))
    decay_start = max(optim.warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return optim.lr
    progress = min(1.0, (step - decay_start + 1) / (total_steps - decay_start))
    return optim.lr + (optim.min_lr - optim.lr) * progress
