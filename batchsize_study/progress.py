"""The progress bar: Lightning's, redrawn at most twice a second instead of after every batch.

Lightning's default ``RichProgressBar(refresh_rate=100)`` marks the bar dirty after every training
and validation batch, and Rich's thread redraws a dirty bar up to 100 times a second: in a
terminal, one full render of the bars and the metrics line per batch. On a CPU run the host is
the device, so those renders take cycles (and the GIL) from training: measured in a pseudo-
terminal on the default small_batch run, the default bar cost 3-6 % of the throughput
(``benchmarks/README.md``). Here the thread wakes twice a second; the counts and metrics it draws
are the same, and hard refreshes (end of an epoch, a validation) are unchanged.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

REDRAWS_PER_SECOND = 2


def progress_bar(callbacks: list[pl.Callback], enabled: bool) -> pl.Callback | None:
    """The bar to add to ``callbacks``: None when the bar is off or the user configured one.

    Without Rich, Lightning's tqdm bar (one text line per redraw, cheap).
    """
    if not enabled or any(isinstance(cb, ProgressBar) for cb in callbacks):
        return None
    if _RICH_AVAILABLE:
        return RichProgressBar(refresh_rate=REDRAWS_PER_SECOND)
    return TQDMProgressBar()
