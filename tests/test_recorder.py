"""metrics.csv does not depend on the host-transfer cadence (``logger.log_every_steps``: 1 on a
CPU, 20 on a GPU): every row carries its own step's values, the detector's smoothed loss
included, and a run the detector stops ends at the same step. Only the wall-clock columns differ.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import make_cfg

from batchsize_study.config import DetectorConfig
from batchsize_study.detector import replay
from batchsize_study.experiments import run
from batchsize_study.recorder import StepRecorder
from batchsize_study.spike import DestabilisationCallback, DestabilisationDetector
from batchsize_study.steps import StepStats

WALL_CLOCK = {"elapsed_s", "tokens_per_second", "mfu"}
"""Columns measured by the clock: the rate over a transfer, the time of a transfer."""

RECORD_WALL_CLOCK = {"wall_seconds", "tokens_per_second", "mfu", "finished_at"}
DETECTOR = DetectorConfig(ignore_first=3, patience=3)


def _rows(metrics_csv: str | Path) -> list[dict[str, str]]:
    """Every row of a metrics.csv, every column but the wall-clock ones."""
    with open(metrics_csv, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in csv.DictReader(fh)]


def _record(rec: dict[str, Any], study: Path) -> dict[str, Any]:
    """A record without its wall-clock values, its study folder written as <study>."""
    text = json.dumps({k: v for k, v in rec.items() if k not in RECORD_WALL_CLOCK})
    return json.loads(text.replace(str(study), "<study>"))


def _at_cadences(tmp_path: Path, *overrides: str) -> list[tuple[dict[str, Any], Path]]:
    out = []
    for every in (1, 5):
        study = tmp_path / f"every{every}"
        rec = run(make_cfg(study, *overrides, f"logger.log_every_steps={every}"))
        out.append((rec, study))
    return out


# ---------------------------------------------------------------- the recorder alone


class _Capture:
    """A logger: what the recorder's logger thread hands over, per step."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.by_step.setdefault(step, {}).update(metrics)


def _record_losses(
    csv_path: Path, every: int, losses: list[float]
) -> tuple[StepRecorder, _Capture, DestabilisationCallback]:
    """Feed a StepRecorder (with a detector that only warns) one loss per optimizer step at a
    transfer cadence of ``every``, as Lightning would, and close it."""
    detector = DestabilisationCallback(DestabilisationDetector.from_config(DETECTOR), False)
    recorder = StepRecorder(str(csv_path), 64, every, consumers=[detector])
    logger = _Capture()
    trainer = SimpleNamespace(
        global_step=0,
        max_steps=len(losses),
        world_size=1,
        is_global_zero=True,
        loggers=[logger],
        should_stop=False,
        sanity_checking=False,
        progress_bar_callback=None,
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision),
    )
    module = SimpleNamespace(step_stats=StepStats(), device=torch.device("cpu"))
    recorder.on_train_start(trainer, module)  # type: ignore[arg-type]
    for i, loss in enumerate(losses):
        trainer.global_step = i + 1
        module.step_stats = StepStats(lr=1e-3 * (i + 1), grad_norm=torch.tensor(0.5 + i))
        outputs = {"loss": torch.tensor(loss)}
        recorder.on_train_batch_end(trainer, module, outputs, None, i)  # type: ignore[arg-type]
    recorder.on_train_end(trainer, module)  # type: ignore[arg-type]
    recorder.teardown(trainer, module, "fit")  # type: ignore[arg-type]
    return recorder, logger, detector


def test_every_row_carries_its_own_smoothed_loss_at_any_cadence(tmp_path):
    """At a cadence of 7 the rows, and the metrics each step hands the loggers, are those of a
    cadence of 1: each row's smoothed loss is the detector's after that step (a replay of the
    same losses), not only the last row of each transfer."""
    losses = [4.0 - 0.1 * i for i in range(12)] + [3.0 + 0.3 * i for i in range(8)]
    losses = torch.tensor(losses).tolist()  # as the recorder sees them: float32
    _, log1, det1 = _record_losses(tmp_path / "one.csv", 1, losses)
    _, log7, det7 = _record_losses(tmp_path / "seven.csv", 7, losses)

    rows = _rows(tmp_path / "seven.csv")
    assert rows == _rows(tmp_path / "one.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert all(r["smoothed_loss"] and r["grad_norm"] and r["lr"] for r in rows)
    assert det7.verdict == det1.verdict and det7.verdict.destabilised  # the rise is noted

    _, smoothed = replay([(i + 1, 0.0, x) for i, x in enumerate(losses)], DETECTOR)
    got = [float(r["smoothed_loss"]) for r in rows]
    assert got[: len(smoothed)] == smoothed
    # After the alarm the detector's EMA stands still: every later row repeats it.
    assert got[len(smoothed) :] == [got[len(smoothed) - 1]] * (len(got) - len(smoothed))

    def untimed(log: _Capture) -> dict[int, dict[str, float]]:
        return {
            s: {k: v for k, v in m.items() if not k.startswith("throughput/")}
            for s, m in log.by_step.items()
        }

    assert untimed(log7) == untimed(log1)
    for row in rows:
        step_metrics = log7.by_step[int(row["step"])]
        assert step_metrics["spike/smoothed_loss"] == float(row["smoothed_loss"])


# ---------------------------------------------------------------- whole runs


def test_superconvergence_rows_and_x_do_not_depend_on_the_transfer_cadence(tmp_path):
    """Issue 19: the same superconvergence run at log_every_steps=1 and 5 writes the same rows
    (every column but the wall-clock ones), stops at the same step and finds the same x."""
    (a, study_a), (b, study_b) = _at_cadences(
        tmp_path, "experiment=superconvergence", "precision=32-true"
    )
    assert a["status"] == "diverged", a["message"]  # the smoke run destabilises: x is measured
    rows_a, rows_b = _rows(a["metrics_csv"]), _rows(b["metrics_csv"])
    train = [r for r in rows_b if r["train_loss"]]
    assert len(train) == a["steps_done"] and all(r["smoothed_loss"] for r in train)
    assert rows_b == rows_a
    assert b["unstable_lr"] == a["unstable_lr"] is not None
    for key in ("steps_done", "spike_step", "alarm_step", "final_val_loss", "final_train_loss"):
        assert b[key] == a[key], key
    assert _record(b, study_b) == _record(a, study_a)


@pytest.mark.slow
def test_small_batch_rows_and_noise_scale_do_not_depend_on_the_transfer_cadence(tmp_path):
    """A run the detector does not stop (small_batch: the noise scale measured, validation and
    checkpoints mid-run cutting transfers short): same rows, same record, noise scale included."""
    (a, study_a), (b, study_b) = _at_cadences(
        tmp_path, "experiment=small_batch", "lr=0.003", "precision=32-true"
    )
    assert a["status"] == "completed", a["message"]
    rows = _rows(b["metrics_csv"])
    assert all(r["smoothed_loss"] for r in rows if r["train_loss"])
    assert rows == _rows(a["metrics_csv"])
    assert b["noise"] == a["noise"] and b["gradient_noise_scale"] == a["gradient_noise_scale"]
    assert math.isfinite(b["noise"]["run_mean"]["b_simple"])
    assert _record(b, study_b) == _record(a, study_a)
