"""The LR schedule as a pure function of the optimizer step.

Not ``transformers.get_cosine_with_min_lr_schedule_with_warmup``: the study also needs a
cosine-shaped and an exponential warmup, and a warmup that spans the whole run
(superconvergence), and the record must be able to state the LR of any step without a scheduler.
"""

from __future__ import annotations

import math

import torch


def lr_multiplier(
    step: int,
    *,
    warmup_steps: int,
    max_steps: int,
    warmup_shape: str = "linear",
    decay: str = "cosine",
    min_lr_ratio: float = 0.1,
    exp_start_ratio: float = 1e-3,
) -> float:
    """Multiplier of the peak LR used for optimizer update number ``step`` (0-based).

    Warmup reaches 1.0 at the last warmup step, so a warmup of the whole run ends at the peak.
    """
    if warmup_steps > 0 and step < warmup_steps:
        frac = (step + 1) / warmup_steps
        if warmup_shape == "linear":
            return frac
        if warmup_shape == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * frac))
        if warmup_shape == "exponential":
            return exp_start_ratio ** (1.0 - frac)
        raise ValueError(f"unknown warmup_shape {warmup_shape!r}")
    if decay == "constant":
        return 1.0
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    # Cosine decay (Loshchilov & Hutter 2017, SGDR) to a floor of min_lr_ratio * peak.
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, peak_lr: float, **kwargs: object) -> float:
    """The LR of optimizer update ``step`` (0-based)."""
    return peak_lr * lr_multiplier(step, **kwargs)  # type: ignore[arg-type]


def build_scheduler(
    optimizer: torch.optim.Optimizer, **kwargs: object
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over :func:`lr_multiplier`; Lightning steps it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, **kwargs))  # type: ignore[arg-type]
