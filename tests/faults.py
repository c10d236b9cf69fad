"""Fault injection for tests, added to a run through config like any callback:
``+callbacks.nan._target_=faults.InjectNaN +callbacks.nan.step=3`` (with ``tests/`` on
PYTHONPATH). Nothing here ships in the package."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch


class InjectNaN(pl.Callback):
    """At optimizer step ``step`` on ``rank`` (None: every rank) poison one weight with NaN, so
    that rank's next loss is NaN: exercises the non-finite-loss path end to end."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")
