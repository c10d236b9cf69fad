"""wandb: offline by default, never waiting on a network, never leaving a process behind.

Runs of one study share a ``group``; each experiment is a ``job_type``. Offline runs are written
under ``<study.dir>/wandb/`` and uploaded later with ``wandb sync <study.dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from batchsize_study.config import LoggerConfig

log = logging.getLogger(__name__)


def make_wandb_logger(
    cfg: LoggerConfig,
    study_dir: str,
    group: str,
    job_type: str,
    run_id: str,
    config: dict[str, Any],
) -> Any | None:
    """A WandbLogger, or None when wandb is off. An online run that cannot reach the server within
    ``wandb_init_timeout`` falls back to offline with a warning; training goes on."""
    if not cfg.wandb or cfg.wandb_mode == "disabled":
        return None
    try:
        import wandb
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        log.warning("wandb is not installed: logging to metrics.csv only")
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    save_dir = os.path.join(study_dir, "wandb")
    os.makedirs(save_dir, exist_ok=True)
    settings = wandb.Settings(init_timeout=cfg.wandb_init_timeout, console="off", silent=True)
    common = dict(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity,
        group=group,
        job_type=job_type,
        name=run_id,
        save_dir=save_dir,
        config=config,
        settings=settings,
        reinit="finish_previous",
    )
    mode = cfg.wandb_mode
    lg = WandbLogger(offline=(mode == "offline"), **common)
    try:
        run = lg.experiment  # starts the run now, so a network failure shows here, not mid-training
    except Exception as exc:  # wandb raises its own error types on a failed init
        if mode != "online":
            log.warning(
                "wandb could not start (%s): logging to metrics.csv only", type(exc).__name__
            )
            teardown()
            return None
        log.warning(
            "wandb online could not start within %ss (%s): falling back to offline",
            cfg.wandb_init_timeout,
            type(exc).__name__,
        )
        try:
            lg = WandbLogger(offline=True, **common)
            run = lg.experiment
        except Exception as exc2:
            log.warning(
                "wandb offline could not start either (%s): logging to metrics.csv only",
                type(exc2).__name__,
            )
            teardown()
            return None
    try:
        run.define_metric("val/loss", summary="min")
        run.define_metric("train/loss", summary="last")
    except Exception:  # older wandb, or a disabled run
        pass
    return lg


def summarise(loggers: list[Any], record: dict[str, Any]) -> None:
    for lg in loggers:
        exp = getattr(lg, "experiment", None)
        if exp is None or not hasattr(exp, "summary"):
            continue
        keys = (
            "status",
            "final_train_loss",
            "final_val_loss",
            "unstable_lr",
            "spike_step",
            "lr",
            "batch_size",
            "accumulate_grad_batches",
            "tokens_seen",
            "tokens_per_second",
            "mfu",
            "z_over_x",
            "gradient_noise_scale",
        )
        exp.summary.update({k: record[k] for k in keys if record.get(k) is not None})


def finish_wandb(loggers: list[Any]) -> None:
    """Finish the run and stop wandb's service process, so nothing is left running."""
    if not loggers:
        return
    try:
        import wandb

        if wandb.run is not None:
            try:
                wandb.finish(quiet=True)
            except TypeError:  # wandb >= 0.2x dropped `quiet`; an unfinished run breaks the next
                wandb.finish()
    except Exception as exc:
        log.warning("wandb.finish failed: %s", exc)
    teardown()


def teardown() -> None:
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass
