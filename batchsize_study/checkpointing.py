"""Crash-safe checkpoints and resume: the same command picks a killed run up where it stopped.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temp file in the same folder, fsyncs
  it and renames it over the target, so a crash mid-write leaves the previous file intact.
- :func:`find_resume_checkpoint` picks the newest checkpoint that loads; a corrupt or truncated
  one is skipped with a warning, and when every one is unreadable the run stops with one line
  (never a silent fresh start).
- :class:`ResumeCallback` stores the RNG states in the checkpoint and turns SIGTERM (a cluster
  pre-empting the job) into a checkpoint at the next optimizer-step boundary and a clean stop.

The data position needs no state here: the training order is a pure function of (seed, sample
index), and the data module starts at ``global_step x accumulation x micro_batch_size``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import re
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from batchsize_study.errors import UserError
from batchsize_study.study import write_bytes_atomic

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"^step(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to ``.<name>.tmp`` beside the target, fsync, ``os.replace``, fsync the folder."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        # Serialise in memory first (as Lightning does): torch.save straight into a file turns a
        # failed write (disk full) into an opaque RuntimeError instead of an OSError.
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        write_bytes_atomic(path, buf.getbuffer())


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint every N optimizer steps that, on a step with validation, saves after the
    validation: Lightning treats a resume from a checkpoint saved before it as "validation done"
    and would skip it, leaving a hole in metrics.csv."""

    def __init__(self, val_every_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_every_steps = val_every_steps
        self._deferred = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        every = self._every_n_train_steps
        step = trainer.global_step
        at_step = every >= 1 and step % every == 0 and step != self._last_global_step_saved
        if at_step and _validates_after(trainer, self.val_every_steps):
            self._deferred = True
            return
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._deferred and not trainer.sanity_checking:
            self._deferred = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def _validates_after(trainer: pl.Trainer, val_every_steps: int) -> bool:
    """Whether Lightning runs validation right after this optimizer step."""
    step = trainer.global_step
    if not trainer.enable_validation:
        return False
    return step % val_every_steps == 0 or step >= (trainer.max_steps or 0)


def _candidates(ckpt_dir: Path) -> list[Path]:
    """last.ckpt first, then the step files newest first (temp files are never candidates)."""
    steps = []
    for p in ckpt_dir.glob("step*.ckpt"):
        m = _STEP_FILE.match(p.name)
        if m:
            steps.append((int(m.group(1)), p))
    out = [ckpt_dir / "last.ckpt"] if (ckpt_dir / "last.ckpt").is_file() else []
    return out + [p for _, p in sorted(steps, reverse=True)]


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step stored in a checkpoint; raises when the file does not load."""
    # mmap: the zip index and the pickle are read (a truncated file fails here), the tensors are
    # not, so checking a multi-GB checkpoint is cheap; Lightning loads the chosen one fully.
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise ValueError("not a Lightning checkpoint (no state_dict/global_step)")
    return int(ckpt["global_step"])


def find_resume_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[str, int] | None:
    """(path, global_step) of the newest checkpoint that loads, or None when there is none.

    Unreadable files are skipped with a warning; if there are checkpoints but none loads, raise a
    UserError rather than silently starting over.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    best: tuple[str, int] | None = None
    bad: list[str] = []
    for p in _candidates(ckpt_dir):
        try:
            step = checkpoint_step(p)
        except Exception as exc:  # truncated zip, unpickling error, empty file, ...
            log.warning("checkpoint %s is unreadable (%s): skipping it", p, type(exc).__name__)
            bad.append(p.name)
            continue
        if best is None or step > best[1]:
            best = (str(p), step)
    if best is None and bad:
        raise UserError(
            f"checkpoints in {ckpt_dir} are all unreadable ({', '.join(bad)}); delete that folder to "
            "start the run over, or run again with force=true"
        )
    if best is not None and bad:
        log.warning("resuming from the previous valid checkpoint %s", best[0])
    return best


def _rng_state() -> dict[str, Any]:
    """Plain tensors, lists and numbers only, so the checkpoint still loads with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Preempted(Exception):
    """Raised by ResumeCallback after the SIGTERM checkpoint; the experiment records
    ``interrupted``."""


class ResumeCallback(pl.Callback):
    """RNG states in every checkpoint; SIGTERM -> checkpoint at the next step boundary, then stop.

    Lightning's own SIGTERM handling raises mid-accumulation and writes no checkpoint; this
    handler only sets a flag, and the stop happens where the data position is a whole number of
    optimizer steps, so the resumed run continues exactly.
    """

    def __init__(self, last_ckpt: str | os.PathLike | None, val_every_steps: int) -> None:
        self.last_ckpt = str(last_ckpt) if last_ckpt is not None else None
        self.val_every_steps = val_every_steps
        self.sigterm = False
        self.interrupted_at: int | None = None
        self._previous: Any = None
        self._last_step = -1
        self._stop_after_val = False

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            _set_rng_state(state_dict["rng"])

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: checkpointing at the next optimizer step, then stopping")
        self.sigterm = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        try:  # replaces Lightning's handler (which raises mid-accumulation); restored at teardown
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread (e.g. some launchers): keep Lightning's
            self._previous = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # mid-accumulation: not a place to stop
        self._last_step = trainer.global_step
        stop = bool(trainer.strategy.reduce_boolean_decision(self.sigterm, all=False))
        if stop and self.interrupted_at is None:
            if _validates_after(trainer, self.val_every_steps):
                self._stop_after_val = True  # see StepCheckpoint: save after the validation
            else:
                self._stop(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stop_after_val and not trainer.sanity_checking:
            self._stop_after_val = False
            self._stop(trainer)

    def _stop(self, trainer: pl.Trainer) -> None:
        if self.last_ckpt is not None:
            trainer.save_checkpoint(self.last_ckpt)
        self.interrupted_at = trainer.global_step
        log.warning(
            "pre-empted at step %d (%s); run the same command to resume",
            trainer.global_step,
            f"checkpoint {self.last_ckpt}" if self.last_ckpt else "no checkpoint: starts over",
        )
        # An exception, not should_stop: Lightning runs a validation before an early stop, which
        # costs the grace period and adds a row the uninterrupted run does not have.
        raise Preempted(trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
