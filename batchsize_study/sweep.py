"""``experiment=lr_sweep``: the real training run at a log grid of peak LRs, and its summary.

Each grid point is an ordinary training run (``experiments.train``, task ``lr_sweep``) with the
batch size, step budget, warmup and decay the study's small_batch / large_batch runs use, so its
final loss is the one those runs would reach at that LR. A finished run is reported, not redone
(train() finds it by run id; the grid settings are not part of that id, so a widened grid reuses
the points it shares).

Two ways to run a grid, with the same records:

* ``sweep.point=null`` (a single run, ``python -m batchsize_study experiment=lr_sweep``): one
  process trains every point, then writes the summary.
* ``sweep.point=i``: only point ``i`` of seeds x LRs (seed-major, LRs in the order asked). A
  ``-m`` multirun of experiment=lr_sweep expands ``sweep.point`` over the grid by itself
  (conf/experiment/lr_sweep.yaml), so a launcher (joblib, submitit) runs the points as parallel
  jobs, and ``batch_size=16,64`` gives both grids. An index whose LR snaps onto an earlier
  index's (the grid is snapped to powers of 2 and deduplicated) is reported and skipped. Every job
  then looks for the grid's records; the one that finds them all writes the summary.

The summary record (experiment ``lr_sweep_summary``, one per batch size and seed set) is computed
from the grid's point records as the study folder holds them (ordered by the one selection,
:func:`batchsize_study.study.select_records`), never from one process's memory: whichever job
finishes last, and the serial run, write the same content under the same run id. It holds one
point per run and :func:`batchsize_study.lr_sensitivity.summarise` of them: best LR, stability
cliff and how the noise was estimated. The report recomputes it from the point records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from batchsize_study.config import Config, SweepConfig
from batchsize_study.data import prepare_corpus
from batchsize_study.errors import UpstreamError
from batchsize_study.lr_sensitivity import SUMMARY, point, summarise, sweep_lrs
from batchsize_study.runtime import compat_key, config_hash, study_dir
from batchsize_study.study import (
    FINAL_STATUSES,
    RECORD,
    find_unstable_lr,
    make_run_id,
    read_records,
    run_name,
    runs_dir,
    select_records,
    stable_hash,
    write_record,
)
from batchsize_study.study.stages import LR_SWEEP
from batchsize_study.training import train

log = logging.getLogger("batchsize_study")

DONE = (*FINAL_STATUSES, "failed")
"""Point statuses that complete a grid: the statuses the selection reads sweep points with (a
failed point counts as diverged, as in a serial sweep; re-running its job redoes it)."""


def _reference_x(sdir: str, c: Config, key: str) -> tuple[float | None, list[str], str]:
    """x from the study's superconvergence record: at this batch size if there is one, else at
    the smallest batch size measured (the seed measures x at the small batch only)."""
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


@dataclass(frozen=True)
class GridPoint:
    """Job ``index`` of a grid: its seed and LR; ``same_as`` is the earlier index whose LR it
    snaps onto (then it is skipped: that index trains the run)."""

    index: int
    seed: int
    lr: float
    multiple: float | None
    same_as: int | None = None


def grid_points(s: SweepConfig, seed: int, x: float | None) -> list[GridPoint]:
    """Every index of ``sweep.point``: seeds x LRs as asked, each LR snapped as
    :func:`sweep_lrs` snaps it, so the distinct points of a seed are exactly its grid."""
    one = (
        [sweep_lrs([1.0], [v], None, s.snap)[0] for v in s.lrs]
        if s.lrs is not None
        else [sweep_lrs([m], None, x, s.snap)[0] for m in s.multiples]
    )
    out: list[GridPoint] = []
    for sd in s.seeds or [seed]:
        first: dict[float, int] = {}
        for snapped, multiple in one:
            i = len(out)
            out.append(GridPoint(i, sd, snapped, multiple, first.get(snapped)))
            first.setdefault(snapped, i)
    return out


@dataclass(frozen=True)
class Sweep:
    """One batch size's grid as every job of it sees it (x read from the same records)."""

    c: Config
    sdir: str
    key: str
    fingerprint: str
    x: float | None
    x_paths: list[str]
    x_selection: str
    grid: list[tuple[float, float | None]]
    seeds: list[int]

    def extra(self, multiple: float | None) -> dict[str, Any]:
        """What a point's record adds to its derivation (not part of its run id)."""
        return {
            "sweep_multiple": multiple,
            "unstable_lr": self.x,
            "upstream": self.x_paths,
            "sweep_settings": {
                "sigmas": self.c.sweep.sigmas,
                "final_window": self.c.sweep.final_window,
            },
        }

    def run_id(self, lr: float, seed: int) -> str:
        """The run id train() gives the point (its LR is given, so peak LR = lr)."""
        pc = replace(self.c, lr=lr, seed=seed)
        return make_run_id(pc.task, pc.batch_size, seed, config_hash(pc, float(lr)))

    def run_ids(self) -> list[str]:
        return [self.run_id(lr, seed) for seed in self.seeds for lr, _ in self.grid]


def _setup(c: Config) -> Sweep:
    s = c.sweep
    sdir = study_dir(c)
    corpus = prepare_corpus(c.data, c.model.seq_len)
    key = compat_key(c, corpus.fingerprint)
    x, x_paths, x_selection = _reference_x(sdir, c, key)
    grid = sweep_lrs(list(s.multiples), list(s.lrs) if s.lrs else None, x, s.snap)
    seeds = list(s.seeds) if s.seeds else [c.seed]
    return Sweep(c, sdir, key, corpus.fingerprint, x, x_paths, x_selection, grid, seeds)


def run_sweep(c: Config) -> dict[str, Any]:
    """The whole grid, then its summary (``sweep.point=null``); else one grid point as a job."""
    sw = _setup(c)
    if c.sweep.point is not None:
        return run_point(sw, c.sweep.point)
    log.info(
        "lr sweep at batch %d, seeds %s: %s (x = %s)",
        c.batch_size,
        sw.seeds,
        ", ".join(f"{lr:.4g}" for lr, _ in sw.grid),
        f"{sw.x:.4g}" if sw.x else "n/a",
    )
    trained: dict[str, dict[str, Any]] = {}
    for seed in sw.seeds:
        for lr, multiple in sw.grid:
            rec = train(replace(c, lr=lr, seed=seed), extra_record=sw.extra(multiple))
            trained[rec["run_id"]] = rec
    if set(trained) != set(sw.run_ids()):  # pragma: no cover - train() and run_id() disagree
        raise RuntimeError(f"lr sweep: run ids {sorted(trained)} are not {sw.run_ids()}")
    # Ranks > 0 of a DDP run write no records: they summarise what train() returned them.
    summary = write_summary(sw, trained)
    assert summary is not None
    return summary


def run_point(sw: Sweep, index: int) -> dict[str, Any]:
    """Grid point ``index`` as one job; the summary too when this job completes the grid."""
    c = sw.c
    points = grid_points(c.sweep, c.seed, sw.x)
    p = points[index]
    where = f"lr sweep point {index} of {len(points)} (batch {c.batch_size}, seed {p.seed}"
    how = f"{p.multiple:g} × x" if p.multiple is not None else "absolute"
    if p.same_as is not None:
        msg = (
            f"{where}): its LR snaps to {p.lr:.4g}, the LR of point {p.same_as}, which runs it; "
            "skipped"
        )
        log.info(msg)
        result: dict[str, Any] = {"status": "skipped", "sweep_point": index, "message": msg}
    else:
        log.info("%s, lr %.4g = %s)", where, p.lr, how)
        result = train(replace(c, lr=p.lr, seed=p.seed), extra_record=sw.extra(p.multiple))
    write_summary(sw)
    return result


def _span(recs: list[dict[str, Any]]) -> float | None:
    """Seconds from the first point's start to the last one's end (start = finished_at -
    wall_seconds): the grid's elapsed time, serial or as parallel jobs, read off its records."""
    ends = [
        (r["finished_at"], r["wall_seconds"])
        for r in recs
        if r.get("finished_at") and r.get("wall_seconds") is not None
    ]
    if not ends:
        return None
    return round(max(e for e, _ in ends) - min(e - w for e, w in ends), 2)


def write_summary(
    sw: Sweep, fallback: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """Write the summary when every grid point has a final record (``fallback``: records by run
    id for points whose record this process cannot see); else log what is missing and return
    None. The content is a function of the point records and the config alone."""
    c, s = sw.c, sw.c.sweep
    ids = sw.run_ids()
    on_disk = {run_name(r): r for r in read_records(sw.sdir, LR_SWEEP) if r.get("status") in DONE}
    recs = [on_disk.get(i) or (fallback or {}).get(i) for i in ids]
    missing = [i for i, r in zip(ids, recs) if r is None]
    if missing:
        log.info(
            "lr sweep at batch %d: %d of %d grid points still to run (%s); the job that "
            "finishes the last one writes the summary",
            c.batch_size,
            len(missing),
            len(ids),
            ", ".join(missing),
        )
        return None
    chosen = select_records([r for r in recs if r is not None], sw.sdir, sw.key).sweeps
    ordered = chosen.get(c.batch_size, [])
    assert len(ordered) == len(ids), (ids, [run_name(r) for r in ordered])
    points = [point(r, s.final_window) for r in ordered]
    result = summarise(points, s.sigmas)
    chash = stable_hash({"runs": sorted(ids), "cfg": config_hash(c, 0)})
    run_id = make_run_id("lr_sweep-summary", c.batch_size, sw.seeds[0], chash)
    path = runs_dir(sw.sdir) / run_id / RECORD
    x = sw.x
    summary: dict[str, Any] = {
        "experiment": SUMMARY,
        "status": "completed",
        "run_id": run_id,
        "study": c.study.name,
        "batch_size": c.batch_size,
        "seed": sw.seeds[0],
        "seeds": sw.seeds,
        "max_steps": c.max_steps,
        "warmup_steps": c.warmup_steps,
        "schedule": {
            "warmup_shape": c.schedule.warmup_shape,
            "decay": c.schedule.decay,
            "min_lr_ratio": c.schedule.min_lr_ratio,
        },
        "compat_key": sw.key,
        "config_hash": chash,
        "corpus_fingerprint": sw.fingerprint,
        "unstable_lr": x,
        "unstable_lr_source": (
            f"{sw.x_selection} from {', '.join(sw.x_paths)}" if sw.x_paths else sw.x_selection
        ),
        "sweep": {
            "multiples": list(s.multiples),
            "lrs": list(s.lrs) if s.lrs else None,
            "snap": s.snap,
            "final_window": s.final_window,
        },
        "grid": [{"lr": lr, "multiple": m} for lr, m in sw.grid],
        "points": points,
        **result,
        "cliff_over_x": result["cliff_lr"] / x if (x and result["cliff_lr"]) else None,
        "best_over_x": result["best_lr"] / x if (x and result["best_lr"]) else None,
        "compute_seconds": round(sum(p["wall_seconds"] or 0.0 for p in points), 1),
        "wall_seconds": _span(ordered),
    }
    summary["message"] = message(summary)
    summary = write_record(path, summary)
    log.info("lr sweep: %s", summary["message"])
    log.info("record: %s", path)
    from batchsize_study.wandb_results import log_lr_sweep

    log_lr_sweep(c, summary, sw.sdir)  # job_type lr_sweep_summary in wandb, when it is on
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
