"""The progress bar: Lightning's, redrawn at most twice a second instead of after every batch.

Lightning's default ``RichProgressBar(refresh_rate=100)`` marks the bar dirty after every training
and validation batch, and Rich's thread redraws a dirty bar up to 100 times a second: in a
terminal, one full render of the bars and the metrics line per batch (about 5 ms each here). On a
CPU run the host is the device, so those renders take cycles (and the GIL) from training:
measured in a pseudo-terminal on small_batch (``benchmarks/progress_bar.py``), the redraws alone
took 1.6 % of the run with Lightning's default and 0.8 % with this bar (161 against 70 redraws).
Here the thread wakes twice a second; the counts and metrics it draws
are the same, and hard refreshes (end of an epoch, a validation) are unchanged.

The bar shows the step's loss and LR from the StepRecorder's last row (host floats it already
has), read when the bar draws: no ``self.log`` call on the training path (Lightning's logging
machinery costs about a millisecond per call).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from batchsize_study.recorder import StepRecorder

REDRAWS_PER_SECOND = 2


class _RecorderMetrics:
    """Mixin: the bar's metrics plus the StepRecorder's latest loss and LR."""

    reads_step_recorder = True

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, StepRecorder):
                items.update(cb.progress_metrics())
        return items


class StudyRichProgressBar(_RecorderMetrics, RichProgressBar):
    """Rich's bar at ``REDRAWS_PER_SECOND``, with the recorder's loss and LR."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(refresh_rate=REDRAWS_PER_SECOND, **kwargs)


class StudyTQDMProgressBar(_RecorderMetrics, TQDMProgressBar):
    """Lightning's tqdm bar (where Rich is not installed), with the recorder's loss and LR."""


def progress_bar(callbacks: list[pl.Callback], enabled: bool) -> pl.Callback | None:
    """The bar to add to ``callbacks``: None when the bar is off or the user configured one.

    Without Rich, Lightning's tqdm bar (one text line per redraw, cheap).
    """
    if not enabled or any(isinstance(cb, ProgressBar) for cb in callbacks):
        return None
    return StudyRichProgressBar() if _RICH_AVAILABLE else StudyTQDMProgressBar()
