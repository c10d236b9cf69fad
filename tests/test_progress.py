"""The progress bar redraws on a timer, not after every batch (batchsize_study/progress.py)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from batchsize_study.progress import REDRAWS_PER_SECOND, progress_bar


def test_the_bar_redraws_twice_a_second_and_is_the_trainers():
    bar = progress_bar([], enabled=True)
    assert isinstance(bar, RichProgressBar)
    assert bar.refresh_rate == REDRAWS_PER_SECOND == 2  # Lightning's default is 100
    trainer = pl.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False)
    assert trainer.progress_bar_callback is bar


def test_no_bar_when_off_or_when_the_user_configured_one():
    assert progress_bar([], enabled=False) is None
    assert progress_bar([TQDMProgressBar()], enabled=True) is None
