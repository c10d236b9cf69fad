"""The per-step contract between the LightningModule, the recorder and the callbacks it feeds.

One place names what travels each optimizer step, so nothing is read with ``getattr`` from an
attribute that nobody declared:

- the module publishes :class:`StepStats` (the LR the step used, the pre-clip gradient norm as a
  device tensor) in ``module.step_stats`` after clipping, every optimizer step;
- the recorder brings each batch of steps to the host in one transfer and hands the rows, in
  order, to its :class:`StepConsumer` s (the detector, the noise scale), which return metrics to
  log with the newest row.

``collective`` is False when the recorder flushes on an exception: then only this rank is
running, and a consumer must not start a collective (all-reduce) that the other ranks never join.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

StepRow = dict[str, Any]
"""One optimizer step as written to metrics.csv: step, tokens, lr, train_loss, grad_norm, ..."""


@dataclass
class StepStats:
    """What the module measured for the optimizer step just taken."""

    lr: float = 0.0
    grad_norm: torch.Tensor | None = None
    """Global gradient norm before clipping, on the device (no host sync on the hot path)."""


@runtime_checkable
class HasStepStats(Protocol):
    step_stats: StepStats


@runtime_checkable
class StepConsumer(Protocol):
    """A callback fed the recorder's rows; returns namespaced metrics (``spike/``, ``noise/``)."""

    def on_step_rows(
        self, trainer: Any, rows: list[StepRow], collective: bool
    ) -> dict[str, float]: ...
