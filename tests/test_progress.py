"""The progress bar redraws on a timer, not after every batch (batchsize_study/progress.py)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from batchsize_study.progress import REDRAWS_PER_SECOND, StudyTQDMProgressBar, progress_bar
from batchsize_study.recorder import StepRecorder


def test_the_bar_redraws_twice_a_second_and_is_the_trainers():
    bar = progress_bar([], enabled=True)
    assert isinstance(bar, RichProgressBar)
    assert bar.refresh_rate == REDRAWS_PER_SECOND == 2  # Lightning's default is 100
    trainer = pl.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False)
    assert trainer.progress_bar_callback is bar


def test_no_bar_when_off_or_when_the_user_configured_one():
    assert progress_bar([], enabled=False) is None
    assert progress_bar([TQDMProgressBar()], enabled=True) is None


def test_the_bar_shows_the_recorders_loss_and_lr(tmp_path):
    recorder = StepRecorder(str(tmp_path / "metrics.csv"), tokens_per_step=8)
    recorder.last_row = {"train_loss": 4.25, "lr": 0.002, "step": 7}
    for bar in (progress_bar([], enabled=True), StudyTQDMProgressBar()):
        trainer = pl.Trainer(callbacks=[recorder, bar], logger=False, enable_checkpointing=False)
        shown = bar.get_metrics(trainer, None)
        assert shown["loss"] == 4.25 and shown["lr"] == 0.002
        assert getattr(trainer.progress_bar_callback, "reads_step_recorder", False)
