"""Per-optimizer-step metrics: gathered on the device, brought to the host in batches, written to
the run's metrics.csv (the source of truth for ``compare``), the loggers and the detector.

Why not ``self.log`` per step: Lightning's logging path syncs and formats every call; here one
stacked transfer per ``log_every_steps`` serves the CSV, wandb, the progress bar and the detector.
Why not Lightning's CSVLogger: it rewrites its file when a new key appears and knows nothing of a
resumed run; this file has a fixed schema, is appended and flushed per batch of rows, and is cut
back to the resumed step, so a crash loses nothing that was logged.

What a row holds does not depend on ``log_every_steps`` (1 on CPU, 20 on a GPU), which only sets
how many steps travel in one transfer: every row carries its own step's values, the detector's
smoothed loss included (the detector is fed one row per call, :meth:`StepRecorder._feed_rows`).
Only the wall-clock columns do: ``tokens_per_second`` and ``mfu`` are the rate over the transfer
that brought the step, and ``elapsed_s`` is the time of that transfer. A run that the detector
stops (superconvergence) transfers every step, so it stops at the step that decided it, not at
the end of a transfer.

``elapsed_s`` is the run's training time, not this process's: a resumed run continues from the
row it resumed at (read back from the file), so the record's timings describe the whole run
(record.py).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import threading
import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch

from batchsize_study.metrics import CSV_FIELDS, elapsed_at, truncate_metrics
from batchsize_study.spike import DestabilisationCallback
from batchsize_study.steps import HasStepStats, StepConsumer, StepRow

log = logging.getLogger(__name__)


LOGGER_FLUSH_SECONDS = 1.0
"""How often the logger thread hands the queued rows to the loggers (and on every drain)."""


class _LoggerThread:
    """Hands metrics to the loggers (wandb) from one background thread, in order, in batches.

    Why a thread: ``wandb.log`` blocks its caller on a round trip to wandb's own I/O thread, a
    few milliseconds per call; on the training thread that is a few percent of a small model's
    step. Why batches: a thread woken for every step (and wandb's threads it wakes in turn) takes
    the GIL from the training thread each time, while the other OpenMP threads wait at their next
    barrier: on small_batch (2 CPU cores) woken per step it cost ~2 % of tokens/s
    (benchmarks/README.md section 1). Woken once per ``LOGGER_FLUSH_SECONDS`` it logs the same
    rows, every step, with their own step numbers; only the dashboard lags by up to a second.
    :meth:`drain` hands over everything queued at once and waits for it.
    """

    def __init__(self, interval: float = LOGGER_FLUSH_SECONDS) -> None:
        self.interval = interval
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, loggers: list[Any], metrics: dict[str, float], step: int) -> None:
        with self._cond:  # no notify: the thread takes the rows on its next wake
            self._items.append((loggers, metrics, step))
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="metrics-logger", daemon=True)
            self._thread.start()

    def drain(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        with self._cond:
            self._items.append(done)
            self._cond.notify()
        if not done.wait(timeout=300):
            log.warning("the loggers did not take the queued metrics within 300s; going on")

    def __getstate__(self) -> dict[str, Any]:  # a copied/pickled recorder gets its own thread
        return {"interval": self.interval}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.get("interval", LOGGER_FLUSH_SECONDS))

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._items:
                    self._cond.wait(timeout=self.interval)
                items, self._items = self._items, deque()
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()
                    continue
                loggers, metrics, step = item
                for lg in loggers:
                    try:
                        lg.log_metrics(metrics, step=step)
                    except Exception as exc:  # a logger failing must not stop training
                        log.warning("logger %s failed: %s", type(lg).__name__, exc)


class StepRecorder(pl.Callback):
    """Collects one row per optimizer step; see the module docstring.

    ``consumers`` are fed every batch of rows, in the order given (the contract is
    :class:`batchsize_study.steps.StepConsumer`); the module must publish ``step_stats``.
    The detector is fed one row per call, so each row gets the smoothed loss after its own step.

    After training: :attr:`train_seconds` (this process's training time, as counted in
    elapsed_s) and :attr:`startup_steps` (the steps of the whole run whose timing holds a
    process's start-up; kept in the checkpoint) for the record's timings.
    """

    def __init__(
        self,
        csv_path: str,
        tokens_per_step: int,
        log_every_steps: int = 1,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        warmup_steps: int = 3,
        consumers: list[StepConsumer] | None = None,
    ) -> None:
        self.csv_path = csv_path
        self.consumers = list(consumers or [])
        # Steps whose timing holds start-up (first batch, lazy init, compilation) are left out of
        # the throughput the record reports; they are still written to metrics.csv.
        self.warmup_steps = warmup_steps
        self.tokens_per_step = tokens_per_step
        self.log_every_steps = log_every_steps
        # A consumer that stops the run on what it reads must see each step before the next one
        # starts; otherwise the run overruns its stop by up to one transfer, and the rows, the
        # final validation and the record would depend on the cadence.
        self.transfer_every = 1 if any(map(_stops_run, self.consumers)) else max(1, log_every_steps)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._acc: torch.Tensor | None = None
        self._pending: list[tuple[int, float, torch.Tensor, torch.Tensor | None]] = []
        self._last_step = self._start_step = 0
        self._t_last = 0.0
        self._t_start = 0.0
        self._elapsed_before = 0.0  # training time of the processes before a resume
        self.train_seconds = 0.0
        self._t_bar = -1.0
        self._fh: Any = None
        self._writer: csv.DictWriter | None = None
        self.last_row: dict[str, float] = {}
        self.steps_recorded = 0
        self.startup_steps: list[int] = []
        self.nonfinite_step: int | None = None
        self._loggers = _LoggerThread()
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None

    # ------------------------------------------------------------- lifecycle

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, HasStepStats):
            raise TypeError(f"{type(pl_module).__name__} does not publish step_stats (steps.py)")
        self._trainer, self._module = trainer, pl_module
        self._last_step = self._start_step = trainer.global_step
        # Steps after the checkpoint are trained again: their start-up marks go with their rows.
        self.startup_steps = [s for s in self.startup_steps if s <= trainer.global_step]
        if trainer.is_global_zero:
            os.makedirs(os.path.dirname(self.csv_path), exist_ok=True)
            truncate_metrics(self.csv_path, trainer.global_step)
            new = not os.path.exists(self.csv_path)
            self._fh = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in teardown
            self._writer = csv.DictWriter(self._fh, fieldnames=CSV_FIELDS)
            if new:
                self._writer.writeheader()
                self._fh.flush()
        # A resumed run's clock continues from the row it resumed at (0 on a fresh run).
        self._elapsed_before = elapsed_at(self.csv_path, trainer.global_step)
        self.train_seconds = 0.0
        self._t_start = self._t_last = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """Called first when a checkpoint is written (the recorder precedes its consumers in the
        callback list): flush pending rows, so the checkpoint's step is in metrics.csv and the
        consumers' states saved next have seen it (``log_every_steps`` > 1). Holds the
        start-up steps so far: a resumed run's record leaves them out of its throughput too."""
        if self._pending and self._trainer is not None and self._module is not None:
            self.flush(self._trainer, self._module)
        return {"startup_steps": list(self.startup_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the start-up steps of the processes before the checkpoint (none in older
        checkpoints: then only this process's are left out)."""
        self.startup_steps = [int(s) for s in state_dict.get("startup_steps", [])]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._loggers.drain()
        if self._fh is not None:
            self._fh.close()
            self._fh, self._writer = None, None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush(trainer, pl_module)
        self._loggers.drain()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        try:
            self.flush(trainer, pl_module, collective=False)
        finally:
            self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------- per step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Lightning hands callbacks the loss divided by the accumulation count: the sum over
            # the micro-batches of one step is that step's mean loss.
            loss = loss.detach()
            self._acc = loss if self._acc is None else self._acc + loss
        if trainer.global_step == self._last_step:
            return  # still accumulating
        self._last_step = trainer.global_step
        acc, self._acc = self._acc, None
        if acc is None:
            acc = torch.tensor(float("nan"), device=pl_module.device)
        stats = pl_module.step_stats  # type: ignore[attr-defined]  (checked at train start)
        self._pending.append((trainer.global_step, float(stats.lr), acc, stats.grad_norm))
        if len(self._pending) >= self.transfer_every or trainer.global_step >= (
            trainer.max_steps or 0
        ):
            self.flush(trainer, pl_module)
            # The study's bar reads progress_metrics() when it draws (progress.py). Another bar
            # gets the values through log(), which costs about a millisecond: at most twice a
            # second.
            bar = trainer.progress_bar_callback
            now = time.perf_counter()
            if (
                bar is not None
                and not getattr(bar, "reads_step_recorder", False)
                and now - self._t_bar >= 0.5
            ):
                self._t_bar = now
                pl_module.log_dict(
                    self.progress_metrics(),
                    prog_bar=True,
                    logger=False,
                )

    def progress_metrics(self) -> dict[str, float]:
        """The latest step's loss and LR for the progress bar (host floats, no sync)."""
        row = self.last_row
        return {k: row[src] for k, src in (("loss", "train_loss"), ("lr", "lr")) if src in row}

    def flush(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, collective: bool = True
    ) -> None:
        """Bring pending rows to the host in one transfer; write, log, and feed the detector."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        losses = torch.stack([p[2].float() for p in pending])
        norms = torch.stack(
            [
                p[3].float() if p[3] is not None else torch.tensor(math.nan, device=losses.device)
                for p in pending
            ]
        ).to(losses.device)
        if collective and trainer.world_size > 1:
            losses = trainer.strategy.reduce(losses, reduce_op="mean")
        values = torch.stack([losses, norms]).tolist()  # the one host sync for these steps
        now = time.perf_counter()
        tps = self.tokens_per_step * len(pending) / max(now - self._t_last, 1e-9)
        self._t_last = now
        if pending[0][0] - self._start_step <= self.warmup_steps:
            # Start-up (first batch, lazy init, compilation) is in this rate: the record's
            # throughput leaves these steps out; they are still written to metrics.csv.
            self.startup_steps.extend(p[0] for p in pending)
        mfu = None
        if self.flops_per_token and self.peak_flops:
            mfu = self.flops_per_token * tps / self.peak_flops
        self.train_seconds = now - self._t_start
        rows: list[StepRow] = []
        for (step, lr, _, _), loss, norm in zip(pending, values[0], values[1]):
            rows.append(
                {
                    "step": step,
                    "tokens": step * self.tokens_per_step,
                    "lr": lr,
                    "train_loss": loss,
                    "grad_norm": norm,
                    "tokens_per_second": tps,
                    "mfu": mfu,
                    "elapsed_s": self._elapsed_before + self.train_seconds,
                }
            )
            if not math.isfinite(loss) and self.nonfinite_step is None:
                self.nonfinite_step = step
        # Metrics to log with each row: a row-wise consumer's answer for that row, the others'
        # (read from device state once per transfer) with the newest row.
        extras: list[dict[str, float]] = [{} for _ in rows]
        for consumer in self.consumers:
            if _reads_rows(consumer):
                self._feed_rows(trainer, consumer, rows, extras, collective)
            else:
                extras[-1].update(consumer.on_step_rows(trainer, rows, collective) or {})
        for row, extra in zip(rows, extras):
            if "spike/smoothed_loss" in extra:
                row["smoothed_loss"] = extra["spike/smoothed_loss"]
        self.steps_recorded += len(rows)
        self.last_row = rows[-1]
        if trainer.is_global_zero:
            self._write(rows)
            for row, extra in zip(rows, extras):
                metrics = {
                    "train/loss": row["train_loss"],
                    "train/lr": row["lr"],
                    "train/grad_norm": row["grad_norm"],
                    "tokens_seen": row["tokens"],
                    "throughput/tokens_per_second": tps,
                }
                if mfu is not None:
                    metrics["throughput/mfu"] = mfu
                metrics.update(extra)
                if trainer.loggers:
                    self._loggers.put(trainer.loggers, metrics, row["step"])

    @staticmethod
    def _feed_rows(
        trainer: pl.Trainer,
        consumer: StepConsumer,
        rows: list[StepRow],
        extras: list[dict[str, float]],
        collective: bool,
    ) -> None:
        """Feed a row-wise consumer (the detector) one row per call, so each row gets the answer
        after its own step (the smoothed loss) whatever the number of rows per transfer.

        No collective per call: the stop decision is reduced across ranks once per transfer,
        here, as the detector did once per call when it was fed the whole batch. Rows after the
        one that stopped the run are not fed (the detector judged nothing past it before).
        """
        stopping = trainer.should_stop
        stopped = False
        for row, extra in zip(rows, extras):
            extra.update(consumer.on_step_rows(trainer, [row], False) or {})
            if trainer.should_stop and not stopping:
                stopped = True
                break
        reduce = collective and trainer.world_size > 1
        if reduce and trainer.strategy.reduce_boolean_decision(stopped, all=False):
            trainer.should_stop = True

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Close the training interval here, so validation time is not counted as training time.
        self.flush(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_last = time.perf_counter()
        if trainer.sanity_checking or not getattr(pl_module, "last_val", None):
            return
        self.flush(trainer, pl_module)
        step = trainer.global_step
        val = pl_module.last_val
        if trainer.is_global_zero:
            self._write(
                [
                    {
                        "step": step,
                        "tokens": step * self.tokens_per_step,
                        "val_loss": val["val/loss"],
                        "val_ppl": val["val/ppl"],
                        "val_loss_se": val.get("val/loss_se"),
                    }
                ]
            )
            if trainer.loggers:
                metrics = {k: v for k, v in val.items() if math.isfinite(v)}
                self._loggers.put(trainer.loggers, metrics, step)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self._writer is None:
            if not os.path.exists(self.csv_path):
                return
            # A validation after fit (the final one) comes after teardown closed the file.
            self._fh = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in teardown
            self._writer = csv.DictWriter(self._fh, fieldnames=CSV_FIELDS)
        for row in rows:
            self._writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS})
        self._fh.flush()


def _reads_rows(consumer: StepConsumer) -> bool:
    """Whether a consumer answers per row (the detector: fed row by row) rather than from device
    state read once per transfer (the noise scale, whose EMAs exist only at the newest step)."""
    return isinstance(consumer, DestabilisationCallback)


def _stops_run(consumer: StepConsumer) -> bool:
    """Whether a consumer stops the run on what it reads (superconvergence's detector): then
    every step is transferred, so the run stops where it would at a cadence of 1."""
    return isinstance(consumer, DestabilisationCallback) and consumer.stop_on_rise
