"""A training run's outcome and the one function that turns it into its record (result.json).

The record's fields are the contract of DESIGN.md (fields may be added, never renamed). The
final losses come from metrics.csv, so a resumed run's record describes the whole run, not only
the steps since the resume.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchsize_study import __version__
from batchsize_study.batch import BatchPlan
from batchsize_study.config import Config, OptimConfig
from batchsize_study.detector import Verdict
from batchsize_study.metrics import METRICS, read_metrics
from batchsize_study.stats import fmt, median
from batchsize_study.study import RECORD, LRChoice
from batchsize_study.study.stages import SMALL_BATCH, STAGES

log = logging.getLogger("batchsize_study")


@dataclass
class RunOutcome:
    """Everything a finished, failed or interrupted training run hands to its record."""

    config: Config
    plan: BatchPlan
    run_id: str
    run_dir: Path
    config_hash: str
    compat_key: str
    corpus: dict[str, Any]
    """The corpus's description for the record: fingerprint, vocab size (and token hash)."""
    lr: LRChoice
    optim: OptimConfig
    """The optimizer settings used (Adam's betas and eps may be scaled by the SDE rule)."""
    status: str
    message: str
    steps_done: int
    verdict: Verdict
    started_at: float
    """This process's start (time.time()): the record counts its whole time (setup included)."""
    precision: str
    host_allocator: str = "system"
    """What runtime.tune_host_allocator did: throughput depends on it on a CPU."""
    flops_per_token: float | None = None
    peak_flops: float | None = None
    train_seconds: float = 0.0
    """This process's training time as counted in metrics.csv's elapsed_s (0: trained nothing)."""
    startup_steps: list[int] = field(default_factory=list)
    """Steps of the whole run whose timing holds a process's start-up: left out of the
    throughput (StepRecorder.startup_steps)."""
    val: dict[str, float] = field(default_factory=dict)
    """The last validation of this process (empty when it ran none)."""
    noise: dict[str, Any] | None = None
    gradient_noise_scale: float | None = None
    checkpoint: Path | None = None
    failed_step: int | None = None


def build_record(o: RunOutcome) -> dict[str, Any]:
    """The record of a training run (result.json)."""
    c, plan, v, extra = o.config, o.plan, o.verdict, o.lr.derivation
    curves = read_metrics(o.run_dir / METRICS)
    final_val = (
        (o.val.get("val/loss"), o.val.get("val/ppl"), o.val.get("val/loss_se"))
        if o.val
        else curves.final_val
    )
    # Timing describes the whole run, across resumed processes (metrics.csv): tokens/s is the
    # median over its steps of each step's transfer rate, start-up steps left out; wall_seconds
    # is its training time (the last elapsed_s, which continues across a resume) plus this
    # process's time outside training (setup, final validation). Earlier processes' setup and
    # steps they ran past their last checkpoint (trained again) are not counted.
    rates = curves.steady_tokens_per_second(set(o.startup_steps))
    tps = median(rates) if rates else None
    this_process = time.time() - o.started_at
    trained = curves.train_seconds
    wall = this_process if trained is None else trained + max(0.0, this_process - o.train_seconds)
    rec: dict[str, Any] = {
        "experiment": c.task,
        "status": o.status,
        "message": o.message,
        "run_id": o.run_id,
        "study": c.study.name,
        "seed": c.seed,
        "batch_size": c.batch_size,
        "micro_batch_size": c.micro_batch_size,
        "devices": plan.world_size,
        "accumulate_grad_batches": plan.accumulate_grad_batches,
        "seq_len": c.model.seq_len,
        "tokens_per_step": plan.tokens_per_step,
        "max_steps": c.max_steps,
        "warmup_steps": c.warmup_steps,
        "lr": o.lr.peak_lr,
        "lr_source": o.lr.source,
        "unstable_lr": extra.get("unstable_lr"),
        "spike_step": None,
        "steps_done": o.steps_done,
        "tokens_seen": o.steps_done * plan.tokens_per_step,
        "final_train_loss": curves.final_train_loss,
        "final_val_loss": final_val[0] if final_val else None,
        "final_val_ppl": final_val[1] if final_val else None,
        "final_val_loss_se": final_val[2] if final_val else None,
        "checkpoint": str(o.checkpoint) if o.checkpoint and o.checkpoint.exists() else None,
        "metrics_csv": str(o.run_dir / METRICS),
        "wall_seconds": round(wall, 2),
        "tokens_per_second": tps,
        "flops_per_token": o.flops_per_token,
        "peak_flops": o.peak_flops,
        "mfu": (o.flops_per_token * tps / o.peak_flops)
        if (tps and o.flops_per_token and o.peak_flops)
        else None,
        "precision": o.precision,
        "host_allocator": o.host_allocator,
        "config_hash": o.config_hash,
        "compat_key": o.compat_key,
        "corpus_fingerprint": o.corpus.get("fingerprint"),
        "vocab_size": o.corpus.get("vocab_size"),
        "corpus_token_hash": o.corpus.get("token_hash"),
        "corpus_python_version": o.corpus.get("python_version"),
        "package_version": __version__,
        "finished_at": time.time(),
        "derivation": extra,
        "adam_betas": list(o.optim.betas),
        "adam_eps": o.optim.eps,
        "adam_sde": extra.get("adam_sde"),
    }
    if o.noise is not None:
        rec["gradient_noise_scale"] = o.gradient_noise_scale  # sequences
        rec["noise"] = o.noise
    stage = STAGES[c.task]
    if stage.record_field:  # a probe's or a sweep point's multiple of x
        rec[stage.record_field] = extra.get(stage.record_field)
    if stage.stops_on_rise and v.destabilised:
        rec.update(
            unstable_lr=v.onset_lr,
            spike_step=v.onset_step,
            alarm_step=v.alarm_step,
            detector_reason=v.reason,
            onset_definition=v.definition,
            warmup_shape=c.schedule.warmup_shape,
            detector=asdict(c.detector),  # lets the report replay metrics.csv under other rules
        )
    if stage.needs == SMALL_BATCH and extra.get("unstable_lr"):
        rec["z_over_x"] = o.lr.peak_lr / extra["unstable_lr"]
        if rec["z_over_x"] > 1:
            log.info(
                "note: z = %.6g exceeds the measured unstable lr x = %.6g (z/x = %.2f); the seed "
                "expects the large batch to stay stable there",
                o.lr.peak_lr,
                extra["unstable_lr"],
                rec["z_over_x"],
            )
    if not stage.stops_on_rise and v.destabilised:  # a rise where none should be: said
        rec["instability_warning"] = {
            "onset_step": v.onset_step,
            "onset_lr": v.onset_lr,
            "reason": v.reason,
        }
    if o.status == "failed" and o.failed_step is not None:
        rec["failed_step"] = o.failed_step
    return rec


def announce(rec: dict[str, Any]) -> None:
    """The run's outcome in a few log lines."""
    log.info(
        "%s: status %s after %d steps (%s tokens) in %.1fs; final train loss %s, val loss %s",
        rec["experiment"],
        rec["status"],
        rec["steps_done"],
        f"{rec['tokens_seen']:,}",
        rec["wall_seconds"],
        fmt(rec["final_train_loss"]),
        fmt(rec["final_val_loss"]),
    )
    if STAGES[rec["experiment"]].stops_on_rise:
        if rec["status"] == "diverged":
            log.info(
                "unstable lr x = %.6g (onset at step %s)", rec["unstable_lr"], rec["spike_step"]
            )
        else:
            log.warning(rec["message"])
    elif rec.get("message"):
        log.warning(rec["message"])
    log.info("record: %s", Path(rec["metrics_csv"]).parent / RECORD)
