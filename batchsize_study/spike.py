"""The destabilisation detector's Lightning callback: feeds the pure detector
(:mod:`batchsize_study.detector`) one rank-reduced loss per optimizer step and acts on its answer.

Naming: ``spike`` survives only in published names (this module, the ``spike/`` metrics, the
record's ``spike_step``); the idea is *destabilisation* everywhere else.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl

from batchsize_study.detector import STABLE, DestabilisationDetector, Verdict, replay

__all__ = ["STABLE", "DestabilisationCallback", "DestabilisationDetector", "Verdict", "replay"]


class DestabilisationCallback(pl.Callback):
    """Feeds the detector one unscaled, rank-reduced loss per optimizer step and acts on it.

    ``stop_on_rise``: superconvergence stops at the onset's alarm; other experiments only stop on a
    non-finite loss (their record says ``failed``) and note a rise as a warning.
    The step rows arrive from :class:`batchsize_study.recorder.StepRecorder` already reduced across
    ranks (the contract is :class:`batchsize_study.steps.StepConsumer`), so every rank reaches the
    same decision; the stop flag is also reduced for safety, except on the exception path
    (``collective=False``), where the other ranks may not be there to join a collective.
    The detector's state travels in the checkpoint, so a resumed run watches the same curve.
    """

    def __init__(self, detector: DestabilisationDetector, stop_on_rise: bool) -> None:
        self.detector = detector
        self.stop_on_rise = stop_on_rise
        self.verdict: Verdict = STABLE
        self.failure: str | None = None

    def on_step_rows(
        self, trainer: pl.Trainer, rows: list[dict[str, float]], collective: bool = True
    ) -> dict[str, float]:
        """Called by the StepRecorder with the newest rows; returns spike/ metrics to log."""
        stop = False
        for row in rows:
            step, loss = int(row["step"]), row["train_loss"]
            if not self.verdict.destabilised:
                self.verdict = self.detector.update(step, row["lr"], loss)
                stop = self.stop_on_rise and self.verdict.destabilised
            if not self.stop_on_rise and not math.isfinite(loss):
                self.failure = f"non-finite training loss ({loss}) at step {step}"
                stop = True
            if stop:
                break
        if collective:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop:
            trainer.should_stop = True
        out = {"spike/smoothed_loss": self.detector.smoothed, "spike/best_loss": self.detector.best}
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (checkpoints load with ``weights_only``)."""
        return {
            "detector": {k: _plain(v) for k, v in vars(self.detector).items()},
            "verdict": asdict(self.verdict),
            "failure": self.failure,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k, v in state_dict.get("detector", {}).items():
            if k == "_verdict":
                v = Verdict(**v)
            elif k in ("_history", "_near"):
                v = [tuple(h) for h in v]
            elif k == "_recent":
                v = deque(tuple(h) for h in v)
            setattr(self.detector, k, v)
        if "verdict" in state_dict:
            self.verdict = Verdict(**state_dict["verdict"])
        self.failure = state_dict.get("failure")


def _plain(v: Any) -> Any:
    if isinstance(v, Verdict):
        return asdict(v)
    if isinstance(v, (list, deque)):
        return [list(x) if isinstance(x, tuple) else x for x in v]
    return v
