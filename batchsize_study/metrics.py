"""metrics.csv: the one per-step schema, written by the recorder and read by everything else.

One row per optimizer step (``train_loss`` set) plus one row per validation (``val_loss`` set).
A resumed run cuts the file back to its checkpoint's step before appending, and a reader keeps
the last row of a step, so the file always describes one uninterrupted run; its clock too:
``elapsed_s`` continues from the row the run resumed at, so it is the whole run's time.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

METRICS = "metrics.csv"
CSV_FIELDS = (
    "step",
    "tokens",
    "lr",
    "train_loss",
    "smoothed_loss",
    "grad_norm",
    "val_loss",
    "val_ppl",
    "tokens_per_second",
    "mfu",
    "elapsed_s",
    "val_loss_se",
)
FINAL_WINDOW = 10
"""The record's final training loss is the mean of the last (up to) this many finite step
losses: less noisy than the last step alone."""


@dataclass(frozen=True)
class Curves:
    """A run's metrics.csv as arrays: training rows (one per step) and validation rows."""

    step: np.ndarray
    tokens: np.ndarray
    lr: np.ndarray
    train_loss: np.ndarray
    smoothed_loss: np.ndarray
    """The detector's smoothed loss as it saw it (NaN where it was not reported)."""
    grad_norm: np.ndarray
    val_step: np.ndarray
    val_tokens: np.ndarray
    val_loss: np.ndarray
    val_ppl: np.ndarray
    val_loss_se: np.ndarray
    """Standard error of each validation loss over its windows (NaN in older files)."""
    elapsed_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Per training row: seconds the run has spent in its training loop up to that step's transfer
    (validation and checkpoints within it included), summed over its processes."""
    tokens_per_second: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Per training row: the rate of the host transfer that brought the step (recorder.py)."""

    @property
    def empty(self) -> bool:
        return len(self.step) == 0

    @property
    def final_train_loss(self) -> float | None:
        return final_train_loss(self.train_loss.tolist())

    @property
    def train_seconds(self) -> float | None:
        """The run's training time: the last elapsed_s (None where no row holds one)."""
        finite = self.elapsed_s[np.isfinite(self.elapsed_s)]
        return float(finite[-1]) if len(finite) else None

    def steady_tokens_per_second(self, startup_steps: Collection[int] = ()) -> list[float]:
        """Each step's tokens/s over the whole run, the steps whose timing holds a process's
        start-up left out (all of them where nothing else is left: a run shorter than its
        warm-up reports what there is)."""
        rates = [
            (int(s), float(r))
            for s, r in zip(self.step, self.tokens_per_second)
            if math.isfinite(r) and r > 0
        ]
        steady = [r for s, r in rates if s not in startup_steps]
        return steady or [r for _, r in rates]

    @property
    def final_val(self) -> tuple[float, float, float] | None:
        """(val loss, val perplexity, its standard error) of the last validation, if any."""
        if len(self.val_step) == 0:
            return None
        return float(self.val_loss[-1]), float(self.val_ppl[-1]), float(self.val_loss_se[-1])


_TRAIN_COLUMNS = (
    "tokens",
    "lr",
    "train_loss",
    "smoothed_loss",
    "grad_norm",
    "elapsed_s",
    "tokens_per_second",
)


def _num(s: str | None) -> float:
    try:
        return float(s) if s not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_metrics(path: str | os.PathLike) -> Curves:
    """Read a metrics.csv (a missing file reads as empty). For a step written twice (a crash
    between the CSV and the checkpoint, then a resume) the last row wins."""
    train: dict[int, tuple[float, ...]] = {}
    val: dict[int, tuple[float, ...]] = {}
    p = Path(path)
    if p.exists():
        with p.open(newline="") as fh:
            for row in csv.DictReader(fh):
                step = _num(row.get("step"))
                if not math.isfinite(step):
                    continue
                if row.get("train_loss") not in (None, ""):
                    train[int(step)] = tuple(_num(row.get(k)) for k in _TRAIN_COLUMNS)
                elif row.get("val_loss") not in (None, ""):
                    val[int(step)] = tuple(
                        _num(row.get(k)) for k in ("tokens", "val_loss", "val_ppl", "val_loss_se")
                    )
    steps, vsteps = sorted(train), sorted(val)
    t = np.array([train[s] for s in steps], dtype=float).reshape(-1, len(_TRAIN_COLUMNS))
    v = np.array([val[s] for s in vsteps], dtype=float).reshape(-1, 4)
    return Curves(
        step=np.array(steps, dtype=float),
        tokens=t[:, 0],
        lr=t[:, 1],
        train_loss=t[:, 2],
        smoothed_loss=t[:, 3],
        grad_norm=t[:, 4],
        val_step=np.array(vsteps, dtype=float),
        val_tokens=v[:, 0],
        val_loss=v[:, 1],
        val_ppl=v[:, 2],
        val_loss_se=v[:, 3],
        elapsed_s=t[:, 5],
        tokens_per_second=t[:, 6],
    )


def final_train_loss(losses: list[float], window: int = FINAL_WINDOW) -> float | None:
    """Mean of the last ``window`` finite losses; None when there is none."""
    finite = [x for x in losses if math.isfinite(x)][-window:]
    return sum(finite) / len(finite) if finite else None


def elapsed_at(path: str | os.PathLike, step: int) -> float:
    """The elapsed_s of the last training row at or before ``step`` (0 when there is none): where
    a resumed run's clock continues, so elapsed_s counts the whole run's training time."""
    c = read_metrics(path)
    keep = (c.step <= step) & np.isfinite(c.elapsed_s)
    return float(c.elapsed_s[keep][-1]) if keep.any() else 0.0


def truncate_metrics(path: str | os.PathLike, max_step: int) -> None:
    """Keep the header and rows up to ``max_step``: a resumed run rewrites what came after."""
    path = str(path)
    if not os.path.exists(path):
        return
    with open(path, newline="") as fh:
        rows = [
            r for r in csv.DictReader(fh) if r.get("step") and int(float(r["step"])) <= max_step
        ]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
