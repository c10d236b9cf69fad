"""``experiment=lr_sweep``: the real training run at a log grid of peak LRs, and its summary.

Each grid point is an ordinary training run (``experiments.train``, task ``lr_sweep``) with the
batch size, step budget, warmup and decay the study's small_batch / large_batch runs use, so its
final loss is the one those runs would reach at that LR. ``batch_size=16,64`` in one Hydra
multirun sweeps both batch sizes. A finished run is reported, not redone (train() finds it by run
id; the grid settings are not part of that id, so a widened grid reuses the points it shares).

The summary record (experiment ``lr_sweep_summary``, one per batch size and seed set) holds one
point per run and :func:`batchsize_study.lr_sensitivity.summarise` of them: best LR, stability
cliff and how the noise was estimated. The report recomputes it from ``points``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any

from batchsize_study.config import Config
from batchsize_study.errors import UpstreamError
from batchsize_study.lr_sensitivity import SUMMARY, summarise, sweep_lrs, window_se
from batchsize_study.metrics import read_metrics

log = logging.getLogger("batchsize_study")


def _reference_x(sdir: str, c: Config, key: str) -> tuple[float | None, list[str], str]:
    """x from the study's superconvergence record: at this batch size if there is one, else at
    the smallest batch size measured (the seed measures x at the small batch only)."""
    from batchsize_study.study import find_unstable_lr, read_records

    recs = [
        r
        for r in read_records(sdir, "superconvergence")
        if r.get("status") == "diverged" and r.get("compat_key") == key
    ]
    sizes = sorted({int(r["batch_size"]) for r in recs if r.get("batch_size")})
    if not sizes:
        if c.sweep.lrs is not None:
            return None, [], "none (absolute sweep.lrs)"
        find_unstable_lr(sdir, c.seed, key, c.batch_size, c.upstream_wait_seconds)  # raises
        raise UpstreamError(f"study.dir={sdir}: no superconvergence record")  # pragma: no cover
    bs = c.batch_size if c.batch_size in sizes else sizes[0]
    up = find_unstable_lr(sdir, c.seed, key, bs, c.upstream_wait_seconds)
    return up.value, up.paths, f"{up.selection}, batch {bs}"


def point(rec: dict[str, Any], final_window: int) -> dict[str, Any]:
    """One run record as a sweep point: its final val loss and the one-seed noise estimate."""
    diverged = rec.get("status") != "completed"
    loss = rec.get("final_val_loss")
    kind = "val"
    if loss is None and not diverged:
        loss, kind = rec.get("final_train_loss"), "train"
    losses = read_metrics(rec["metrics_csv"]).train_loss.tolist() if rec.get("metrics_csv") else []
    return {
        "lr": rec["lr"],
        "seed": rec.get("seed"),
        "final_loss": None if (diverged or loss is None or not math.isfinite(loss)) else loss,
        "loss_kind": kind,
        "diverged": diverged,
        "status": rec.get("status"),
        "train_se": window_se(losses, final_window),
        # The validation set's own standard error of that loss (kind "val" only): the per-step
        # comparison's error bar, where the train window is the sweep's noise estimate.
        "val_se": rec.get("final_val_loss_se") if kind == "val" else None,
        "final_train_loss": rec.get("final_train_loss"),
        "wall_seconds": rec.get("wall_seconds"),
        "run_id": rec.get("run_id"),
        "metrics_csv": rec.get("metrics_csv"),
    }


def run_sweep(c: Config) -> dict[str, Any]:
    """Train every grid point (each writes its own record), then write the summary record."""
    from batchsize_study.data import prepare_corpus
    from batchsize_study.runtime import compat_key, config_hash, study_dir
    from batchsize_study.study import make_run_id, runs_dir, stable_hash, write_json_atomic
    from batchsize_study.training import train

    t0 = time.time()
    s = c.sweep
    sdir = study_dir(c)
    corpus = prepare_corpus(c.data, c.model.seq_len)
    key = compat_key(c, corpus.fingerprint)
    x, x_paths, x_selection = _reference_x(sdir, c, key)
    grid = sweep_lrs(list(s.multiples), list(s.lrs) if s.lrs else None, x, s.snap)
    seeds = list(s.seeds) if s.seeds else [c.seed]
    log.info(
        "lr sweep at batch %d, seeds %s: %s (x = %s)",
        c.batch_size,
        seeds,
        ", ".join(f"{lr:.4g}" for lr, _ in grid),
        f"{x:.4g}" if x else "n/a",
    )
    records = []
    for seed in seeds:
        for lr, multiple in grid:
            extra = {"sweep_multiple": multiple, "unstable_lr": x, "upstream": x_paths}
            records.append(train(replace(c, lr=lr, seed=seed), extra_record=extra))
    points = [point(r, s.final_window) for r in records]
    result = summarise(points, s.sigmas)
    chash = stable_hash({"runs": sorted(r["run_id"] for r in records), "cfg": config_hash(c, 0)})
    run_id = make_run_id("lr_sweep-summary", c.batch_size, seeds[0], chash)
    path = runs_dir(sdir) / run_id / "result.json"
    summary: dict[str, Any] = {
        "experiment": SUMMARY,
        "status": "completed",
        "run_id": run_id,
        "study": c.study.name,
        "batch_size": c.batch_size,
        "seed": seeds[0],
        "seeds": seeds,
        "max_steps": c.max_steps,
        "warmup_steps": c.warmup_steps,
        "schedule": {
            "warmup_shape": c.schedule.warmup_shape,
            "decay": c.schedule.decay,
            "min_lr_ratio": c.schedule.min_lr_ratio,
        },
        "compat_key": key,
        "corpus_fingerprint": corpus.fingerprint,
        "unstable_lr": x,
        "unstable_lr_source": (
            f"{x_selection} from {', '.join(x_paths)}" if x_paths else x_selection
        ),
        "sweep": {
            "multiples": list(s.multiples),
            "lrs": list(s.lrs) if s.lrs else None,
            "snap": s.snap,
            "final_window": s.final_window,
        },
        "grid": [{"lr": lr, "multiple": m} for lr, m in grid],
        "points": points,
        **result,
        "cliff_over_x": result["cliff_lr"] / x if (x and result["cliff_lr"]) else None,
        "best_over_x": result["best_lr"] / x if (x and result["best_lr"]) else None,
        "compute_seconds": round(sum(p["wall_seconds"] or 0.0 for p in points), 1),
        "wall_seconds": round(time.time() - t0, 2),
        "finished_at": time.time(),
    }
    summary["message"] = message(summary)
    write_json_atomic(path, summary)
    summary["_path"] = str(path)
    log.info("lr sweep: %s", summary["message"])
    log.info("record: %s", path)
    return summary


def message(summary: dict[str, Any]) -> str:
    """One line: best LR, cliff and x's place beside them."""
    b, cl = summary.get("best_lr"), summary.get("cliff_lr")
    if b is None:
        return f"batch {summary['batch_size']}: every grid point diverged"
    msg = (
        f"batch {summary['batch_size']}: best LR {b:.4g} (final loss {summary['best_loss']:.4f}"
        f" ± {summary['best_se']:.3f}), cliff {cl:.4g}"
    )
    if summary.get("cliff_upper_lr"):
        msg += f" (next grid LR {summary['cliff_upper_lr']:.4g} is beyond noise)"
    else:
        msg += " (top of the grid: the cliff may be higher)"
    x = summary.get("unstable_lr")
    if x and cl:
        msg += f"; x = {x:.4g} is {x / cl:.3g}x the cliff"
    return msg
