"""Is x real? ``experiment=stability_probe``: short constant-LR runs at multiples of the detected x.

The superconvergence run reads x off a *ramp*: the LR at the onset of a loss rise during a long
warmup. The probe asks the direct question instead: train at the small batch, same seed, at a
constant peak LR of ``m * x`` (after a brief warmup) for several multiples m, and see at which LR
training stops improving. Lightning's LR finder (``Tuner.lr_find``) runs on the same model and data
so its suggestion can be read beside x.

Definitions (what the summary record and :func:`analyse` compute):

* final loss L(m): the mean training loss over the last ``final_window`` steps of the run at
  ``m * x`` (+inf if any loss was non-finite), with its standard error se(m) (the std of those
  steps' losses / sqrt(final_window)).
* m *stops improving* when a higher LR no longer buys a lower loss in the same steps — L(m) is
  worse than the best L(m') at a lower multiple by more than ``noise_sigmas`` combined standard
  errors — or when the run itself destabilised (a non-finite loss, or the study's detector
  ``detector.*`` fired: smoothed loss ``threshold`` above its best for ``patience`` steps). The
  tolerance matters: at a small batch, neighbouring multiples differ by about the batch noise,
  and a plain L(m) >= L(m_prev) is then decided by that noise.
* the empirical boundary is where training stops improving *for good*: ``first_bad`` is the
  smallest multiple from which every higher multiple also stops improving (one noisy multiple
  followed by a good one does not end the range), ``last_good`` the multiple below it; the point
  estimate is their geometric mean. x *agrees* when it lies within a factor of 2 of that
  estimate. The first multiple that stops improving at all is recorded too
  (``first_bad_local``).
* reported beside it, not used for the boundary: the plain L(m) >= L(next-lower m) comparison,
  whether the run's smoothed loss still set a new best in its last ``trend_window`` steps, and the
  multiple with the lowest L (the best LR for this short horizon from initialisation).

The horizon matters: x is read where the ramp destabilised (``spike_step`` of superconvergence,
at a loss the short probes may never reach); probes shorter than that test stability earlier in
training, where it holds only at lower LRs (the reason warmup exists; Gilmer et al. 2021, "A Loss
Curvature Perspective on Training Instability").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from batchsize_study.config import Config, ProbeConfig
from batchsize_study.data import prepare_corpus
from batchsize_study.metrics import METRICS, read_metrics
from batchsize_study.probe_analysis import (
    SUMMARY,
    analyse,
    final_loss,
    final_loss_se,
    still_improving,
)
from batchsize_study.runtime import compat_key, config_hash, study_dir
from batchsize_study.stats import json_safe
from batchsize_study.study import (
    RECORD,
    beside,
    find_unstable_lr,
    make_run_id,
    runs_dir,
    write_record,
)
from batchsize_study.training import train

log = logging.getLogger("batchsize_study")

# ---------------------------------------------------------------- running it


def probe_config(c: Config, s: ProbeConfig, lr: float) -> Config:
    """The training config of one probe: constant LR after ``s.warmup`` steps, ``s.steps`` long."""
    return replace(
        c,
        task="stability_probe",
        lr=lr,
        max_steps=s.steps,
        warmup_steps=s.warmup,
        val_every_steps=s.steps,
        schedule=replace(c.schedule, decay="constant"),
    )


def run_probe(c: Config) -> dict[str, Any]:
    """Run every probe (each writes its own record), Lightning's LR finder, and a summary record."""
    t0 = time.time()
    s = c.probe
    sdir = study_dir(c)
    corpus = prepare_corpus(c.data, c.model.seq_len)
    key = compat_key(c, corpus.fingerprint)
    up = find_unstable_lr(sdir, c.seed, key, c.batch_size, c.upstream_wait_seconds)
    x = up.value
    log.info("stability probe: x = %.6g (%s); multiples %s", x, up.selection, s.multiples)
    probes = []
    for m in s.multiples:
        rec = train(
            probe_config(c, s, m * x),
            extra_record={"probe_multiple": m, "unstable_lr": x, "upstream": up.paths},
        )
        losses = read_metrics(beside(rec, METRICS)).train_loss.tolist()
        probes.append(
            {
                "multiple": m,
                "lr": m * x,
                "final_loss": final_loss(losses, s.final_window),
                "final_loss_se": final_loss_se(losses, s.final_window),
                "improving": still_improving(losses, s.trend_window),
                "destabilised": rec.get("status") == "diverged" or "instability_warning" in rec,
                "status": rec.get("status"),
                "final_val_loss": rec.get("final_val_loss"),
                "run_id": rec.get("run_id"),
            }
        )
    result = analyse(x, probes, s.noise_sigmas)
    finder = run_lr_find(c, s, corpus, x, sdir) if s.lr_find else None
    chash = config_hash(c, x)
    run_id = make_run_id("stability_probe-summary", c.batch_size, c.seed, chash)
    path = runs_dir(sdir) / run_id / RECORD
    suggestion = finder.get("suggestion") if finder else None
    summary = {
        "experiment": SUMMARY,
        "status": "completed",
        "message": _message(result, suggestion),
        "run_id": run_id,
        "study": c.study.name,
        "seed": c.seed,
        "batch_size": c.batch_size,
        "compat_key": key,
        "corpus_fingerprint": corpus.fingerprint,
        "unstable_lr": x,
        "lr_source": f"{up.selection} from {', '.join(up.paths)}",
        "probe": asdict(s),
        "stops_improving_definition": (
            "m stops improving when its final loss (mean of the last final_window steps) is worse "
            "than the best final loss at a lower multiple by more than noise_sigmas combined "
            "standard errors, or its run destabilised (non-finite loss, or the detector fired); "
            "boundary = geometric mean of the last multiple before the first that stops improving "
            "and that one, times x"
        ),
        **json_safe(result),
        "lr_find": finder,
        "lr_find_suggestion": suggestion,
        "lr_find_over_x": (suggestion / x) if suggestion else None,
        "config_hash": chash,
        "wall_seconds": round(time.time() - t0, 2),
    }
    summary = write_record(path, summary)
    log.info("stability probe: %s", summary["message"])
    log.info("record: %s", path)
    return summary


def _message(result: dict[str, Any], suggestion: float | None) -> str:
    x = result["unstable_lr"]
    if result["boundary_lr"] is None:
        msg = f"training still improved at the largest multiple; the boundary is above it (x = {x:.4g})"
    else:
        msg = (
            f"training stops improving {result['boundary']} "
            f"(boundary ~ {result['boundary_lr']:.4g}); x = {x:.4g} is "
            f"{'within' if result['agrees_within_2x'] else 'NOT within'} a factor of 2 of it"
        )
    best = result.get("short_horizon_best_lr")
    if best:
        msg += f"; the lowest final loss of these short runs is at {best:.4g} ({best / x:.3g} x)"
    if suggestion:
        msg += f"; Lightning lr_find suggests {suggestion:.4g} ({suggestion / x:.3g} x)"
    return msg


def run_lr_find(
    c: Config, s: ProbeConfig, corpus: Any, x: float, sdir: str
) -> dict[str, Any] | None:
    """Lightning's ``Tuner.lr_find`` on the same model, data, batch and seed (exponential sweep,
    suggestion = steepest descent of the loss, Lightning's default); None if it fails."""
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    from batchsize_study.batch import plan_batch
    from batchsize_study.data import TokenDataModule
    from batchsize_study.microbatch import resolve_micro_batch
    from batchsize_study.model import CausalLMModule, ModuleSettings
    from batchsize_study.runtime import resolve_precision, resolve_world_size

    world = resolve_world_size(c.trainer)
    precision = resolve_precision(c.precision, c.trainer.get("accelerator"))
    plan = plan_batch(c.batch_size, c.micro_batch_size, world, c.model.seq_len, c.max_steps)
    # micro_batch_size=auto: the number the training runs resolve it to (Lightning takes a number).
    c, plan = resolve_micro_batch(c, plan, corpus.vocab_size, precision, {})
    pl.seed_everything(c.seed, workers=True, verbose=False)
    module = CausalLMModule(
        ModuleSettings(
            model=c.model,
            optim=c.optim,
            schedule=c.schedule,
            vocab_size=corpus.vocab_size,
            peak_lr=x,
            max_steps=s.lr_find_num_training,
            warmup_steps=0,
        )
    )
    root = Path(sdir) / "runs" / f"stability_probe-lr_find-bs{c.batch_size}-seed{c.seed}"
    root.mkdir(parents=True, exist_ok=True)
    trainer_kwargs: dict[str, Any] = {
        "precision": precision,
        "accumulate_grad_batches": plan.accumulate_grad_batches,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,
        "default_root_dir": str(root),
        "limit_val_batches": 0,
    }
    trainer_kwargs.update(c.trainer)
    trainer = pl.Trainer(**trainer_kwargs)
    n = s.lr_find_num_training
    dm = TokenDataModule(
        c.data,
        corpus,
        c.model.seq_len,
        c.micro_batch_size,
        c.seed,
        samples_per_rank=(n + 2) * plan.accumulate_grad_batches * c.micro_batch_size,
    )
    try:
        finder = Tuner(trainer).lr_find(
            module,
            datamodule=dm,
            min_lr=s.lr_find_min_lr,
            max_lr=s.lr_find_max_lr,
            num_training=n,
            update_attr=False,
        )
    except Exception as exc:  # an auxiliary reading: the probe's own answer stands without it
        log.warning("Lightning lr_find failed (%s); the probe continues without it", exc)
        return None
    if finder is None:
        return None
    suggestion = finder.suggestion()
    return {
        "suggestion": float(suggestion) if suggestion is not None else None,
        "method": "lightning.pytorch.tuner.Tuner.lr_find: exponential sweep, steepest descent",
        "min_lr": s.lr_find_min_lr,
        "max_lr": s.lr_find_max_lr,
        "num_training": n,
        "lrs": [float(v) for v in finder.results["lr"]],
        "losses": [float(v) if math.isfinite(v) else None for v in finder.results["loss"]],
    }
