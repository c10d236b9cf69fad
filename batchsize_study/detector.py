"""Destabilisation detection, pure: fed floats, unit-tested on synthetic series (the Lightning
callback that feeds it is :mod:`batchsize_study.spike`).

The seed's step 1 raises the LR slowly until training "destabilises: a rapid loss increase",
and records the LR where that began. The detector answers that from the per-step training loss:
it smooths the loss (EMA with bias correction, as Lightning's LR finder does), tracks the running
best, and fires when the smoothed loss stays ``threshold`` above the best for ``patience`` steps
(a non-finite loss fires at once). Which earlier step is the *onset*, whose LR is x:

* ``rise`` (the seed's literal reading): the last step before the alarm at which the smoothed
  loss was still within ``onset_tolerance`` of its best.
* ``min_loss``: the step of the lowest smoothed loss, where a higher LR stopped buying a lower
  loss: the reading of an LR range test (Smith 2017, "Cyclical Learning Rates for Training Neural
  Networks", section 3.3).
* ``plateau``: the first step at which the smoothed loss came within ``onset_tolerance`` of the
  best it reached before the alarm: where a higher LR stopped buying a *material* improvement.
  ``rise`` reads the end of the plateau the loss sits on before it rises, ``plateau`` its start.
  Measured on the default study (docs/lr_sweep.md), that plateau spans most of a decade of LR
  and full-length runs break near its start.

``lag_correction`` moves the onset back by the EMA's mean lag, ``smoothing / (1 - smoothing)``
steps: the bias-corrected EMA's weights have their centre of mass that far in the past.

Naming: the idea is *destabilisation* (the seed's word) everywhere in the code; ``spike`` survives
only where it is a published contract: this module's name, the ``spike/`` metric namespace and the
record's ``spike_step``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from batchsize_study.config import DetectorConfig


@dataclass(frozen=True)
class Verdict:
    """The detector's answer after a step."""

    destabilised: bool
    onset_step: int | None = None
    onset_lr: float | None = None
    alarm_step: int | None = None
    reason: str = ""
    definition: str = ""
    """Which onset rule produced onset_step/onset_lr (``rise``, ``min_loss`` or ``plateau``, +
    ``lag``)."""


STABLE = Verdict(False)


@dataclass
class DestabilisationDetector:
    """Feed it ``update(step, lr, loss)`` once per optimizer step; it returns a :class:`Verdict`.

    Pure Python, no tensors: the decision is unit-testable on synthetic series and costs nothing.
    Once it has fired it keeps returning the same verdict.
    """

    smoothing: float = 0.9
    threshold: float = 0.05
    patience: int = 10
    onset_tolerance: float = 0.01
    ignore_first: int = 20
    onset: str = "rise"
    lag_correction: bool = False

    _n: int = 0
    _avg: float = 0.0
    _best: float = math.inf
    _above: int = 0
    # (step, lr, smoothed, lagged step, lagged lr) from the best step on
    _history: list[tuple[int, float, float, int, float]] = field(default_factory=list)
    # the same entries for every step still within onset_tolerance of the best (plateau start)
    _near: list[tuple[int, float, float, int, float]] = field(default_factory=list)
    _recent: deque[tuple[int, float]] = field(default_factory=deque)
    _verdict: Verdict = STABLE
    smoothed: float = math.nan

    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> DestabilisationDetector:
        return cls(
            smoothing=cfg.smoothing,
            threshold=cfg.threshold,
            patience=cfg.patience,
            onset_tolerance=cfg.onset_tolerance,
            ignore_first=cfg.ignore_first,
            onset=cfg.onset,
            lag_correction=cfg.lag_correction,
        )

    @property
    def lag(self) -> int:
        """Mean lag of the bias-corrected EMA in steps, smoothing / (1 - smoothing), rounded."""
        return round(self.smoothing / (1.0 - self.smoothing)) if self.lag_correction else 0

    @property
    def definition(self) -> str:
        return self.onset + ("+lag" if self.lag_correction else "")

    @property
    def best(self) -> float:
        return self._best

    def _onset(self) -> tuple[int, float]:
        """The onset's (step, lr) under the configured definition (lagged if asked)."""
        entry = self._history[0]  # min_loss: the step of the best smoothed loss
        if self.onset == "plateau" and self._near:  # the first step within tolerance of the best
            entry = self._near[0]
        if self.onset == "rise":  # walk back from the newest step to the last one near the best
            limit = self._best * (1.0 + self.onset_tolerance)
            entry = next((h for h in reversed(self._history) if h[2] <= limit), entry)
        return (entry[3], entry[4]) if self.lag_correction else (entry[0], entry[1])

    def _last_finite_onset(self, step: int, lr: float) -> tuple[int, float]:
        """The onset when the loss at ``step`` is non-finite: that step has no smoothed loss, so
        the rules read the finite steps before it, exactly as the finite alarm does.

        With a best already tracked that is :meth:`_onset` (``rise``: the last step still within
        tolerance of the best, which is the last finite step when the loss had not risen; lagged
        if asked). Within ``ignore_first`` there is no best yet: the last finite step (its lagged
        step if asked), as the loss was still falling there. Only when no loss was finite at all
        is the non-finite step itself reported (training.py formats the onset's LR, so a None
        would break the record).
        """
        if self._history:
            return self._onset()
        if self._recent:  # the newest entry is the last finite step, the oldest its lagged step
            return self._recent[0] if self.lag_correction else self._recent[-1]
        return step, lr

    def update(self, step: int, lr: float, loss: float) -> Verdict:
        """Feed one optimizer step's (unsmoothed) training loss; returns the verdict so far."""
        if self._verdict.destabilised:
            return self._verdict
        if not math.isfinite(loss):
            onset_step, onset_lr = self._last_finite_onset(step, lr)
            self._verdict = Verdict(
                True,
                onset_step,
                onset_lr,
                step,
                f"non-finite loss ({loss}) at step {step}",
                self.definition,
            )
            return self._verdict
        self._recent.append((step, lr))
        while len(self._recent) > self.lag + 1:
            self._recent.popleft()
        lagged = self._recent[0]
        self._n += 1
        self._avg = self.smoothing * self._avg + (1.0 - self.smoothing) * loss
        self.smoothed = self._avg / (1.0 - self.smoothing**self._n)  # bias-corrected EMA
        if self._n <= self.ignore_first:
            return STABLE
        if self.smoothed < self._best:
            self._best = self.smoothed
            self._history = [(step, lr, self.smoothed, *lagged)]
            limit = self._best * (1.0 + self.onset_tolerance)
            self._near = [h for h in self._near if h[2] <= limit] + self._history
            self._above = 0
            return STABLE
        self._history.append((step, lr, self.smoothed, *lagged))
        if self.smoothed <= self._best * (1.0 + self.onset_tolerance):
            self._near.append(self._history[-1])
        if self.smoothed > self._best * (1.0 + self.threshold):
            self._above += 1
        else:
            self._above = 0
        if self._above >= self.patience:
            onset_step, onset_lr = self._onset()
            rise = self.smoothed / self._best - 1.0
            self._verdict = Verdict(
                True,
                onset_step,
                onset_lr,
                step,
                f"smoothed loss {self.smoothed:.4f} stayed >{self.threshold:.0%} above its best "
                f"{self._best:.4f} for {self.patience} steps (now +{rise:.1%}); onset by "
                f"{self.definition}",
                self.definition,
            )
        return self._verdict


def replay(
    rows: Iterable[tuple[int, float, float]], cfg: DetectorConfig
) -> tuple[Verdict, list[float]]:
    """Feed recorded ``(step, lr, train_loss)`` rows (a run's metrics.csv) to a fresh detector.

    Returns the verdict and the smoothed loss of every row fed (until it fired): onset rules can
    then be compared on one run without training again (the alarm, and so the rows a
    superconvergence run records, does not depend on ``onset``).
    """
    det = DestabilisationDetector.from_config(cfg)
    smoothed: list[float] = []
    verdict = STABLE
    for step, lr, loss in rows:
        verdict = det.update(step, lr, loss)
        smoothed.append(det.smoothed)
        if verdict.destabilised:
            break
    return verdict, smoothed
