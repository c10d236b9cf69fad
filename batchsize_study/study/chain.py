"""The x -> y -> z chain: the LR rules and how a run derives its peak LR from the study's
records, with provenance (which record, which rule)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchsize_study.config import Config
from batchsize_study.errors import ConfigError, UpstreamError
from batchsize_study.probe_analysis import optimum_at_lowest_multiple
from batchsize_study.stats import median
from batchsize_study.study.records import read_records
from batchsize_study.study.stages import PROBE_SUMMARY, SMALL_BATCH, STABILITY_PROBE, STAGES

log = logging.getLogger("batchsize_study.study")


# ---------------------------------------------------------------- LR rules


def small_batch_lr(unstable_lr: float, lr_factor: float) -> float:
    """y = lr_factor * x (the seed's step 2: y = 50 % of the measured unstable LR x)."""
    return lr_factor * unstable_lr


def large_batch_lr(small_lr: float, small_batch: int, large_batch: int, alpha: float) -> float:
    """z = y * (B_large / B_small) ** alpha.

    alpha = 0.5: square-root rule for Adam (Malladi et al. 2022, "On the SDEs and Scaling Rules
    for Adaptive Gradient Algorithms"); alpha = 1: linear rule (Goyal et al. 2017); alpha = -0.5:
    the seed text's literal y * (oldBS/newBS)^0.5.
    """
    return small_lr * (large_batch / small_batch) ** alpha


def adam_sde_hparams(betas: list[float], eps: float, ratio: float) -> tuple[list[float], float]:
    """Adam's betas and eps under the square-root SDE scaling rule for a batch ``ratio`` = B/B0
    (Malladi et al. 2022, Definition 4.2): 1 - beta_i -> ratio * (1 - beta_i), eps -> eps / sqrt(ratio)."""
    new_betas = [max(0.0, 1.0 - ratio * (1.0 - b)) for b in betas]
    return new_betas, eps / math.sqrt(ratio)


@dataclass
class Upstream:
    """What a run derived from: the value, the record(s) and how they were chosen."""

    value: float
    records: list[dict[str, Any]]
    selection: str

    @property
    def paths(self) -> list[str]:
        return [r["_path"] for r in self.records]


def _candidates(
    study_dir: str,
    experiment: str,
    status: str,
    compat_key: str,
    seed: int,
    wait_seconds: float,
    batch_size: int | None,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + wait_seconds
    while True:
        recs = read_records(study_dir, experiment)
        usable = [
            r for r in recs if r.get("status") == status and r.get("compat_key") == compat_key
        ]
        if batch_size is not None:
            usable = [r for r in usable if r.get("batch_size") == batch_size]
        if usable or time.monotonic() >= deadline:
            return usable
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def _choose(usable: list[dict[str, Any]], seed: int, field: str, rule: str = "seed") -> Upstream:
    """The same seed's record (rule ``seed``, when there is one), else the median of them all."""
    same = [r for r in usable if r.get("seed") == seed]
    if same and rule == "seed":
        rec = same[-1]
        return Upstream(float(rec[field]), [rec], f"same seed ({seed})")
    why = "x_from=median" if rule == "median" else f"no record with seed {seed}"
    return Upstream(
        median(float(r[field]) for r in usable),
        usable,
        f"median of {len(usable)} records ({why})",
    )


def find_unstable_lr(
    study_dir: str,
    seed: int,
    compat_key: str,
    batch_size: int,
    wait_seconds: float = 0.0,
    rule: str = "seed",
) -> Upstream:
    """x for small_batch: the superconvergence record of the same seed, else (or with
    ``rule="median"``) the median of every diverged one, newest per seed."""
    usable = _candidates(
        study_dir, "superconvergence", "diverged", compat_key, seed, wait_seconds, batch_size
    )
    newest = {r.get("seed"): r for r in usable}  # oldest first: a re-run of a seed replaces it
    usable = [r for r in usable if newest[r.get("seed")] is r]
    if usable:
        return _choose(usable, seed, "unstable_lr", rule)
    recs = read_records(study_dir, "superconvergence")
    if not recs:
        raise UpstreamError(
            f"study.dir={study_dir}: no superconvergence record; run "
            "`python -m batchsize_study experiment=superconvergence` first (same study.dir), or give lr=<number>"
        )
    seen = ", ".join(
        f"{Path(r['_path']).parent.name}: status={r.get('status')}, batch_size={r.get('batch_size')}"
        for r in recs[-4:]
    )
    raise UpstreamError(
        f"study.dir={study_dir}: no diverged superconvergence record matches this run's model, data, seq_len and "
        f"batch_size={batch_size} (found {seen}); for no_divergence raise lr or max_steps in superconvergence, "
        "or give lr=<number>"
    )


def find_probe_optimum(
    study_dir: str, seed: int, compat_key: str, batch_size: int, wait_seconds: float = 0.0
) -> Upstream:
    """y for small_batch with ``y_from=probe``: the short-horizon optimum of the newest stability
    probe of this model, data and batch size (the same seed's when there is one)."""
    usable = _candidates(
        study_dir, PROBE_SUMMARY, "completed", compat_key, seed, wait_seconds, batch_size
    )
    if not usable:
        raise UpstreamError(
            f"study.dir={study_dir}: y_from=probe needs a stability probe of this model, data and "
            f"batch_size={batch_size}; run `python -m batchsize_study experiment=stability_probe` "
            "first (same study.dir), or use y_from=rule"
        )
    same = [r for r in usable if r.get("seed") == seed]
    rec = (same or usable)[-1]
    best = rec.get("short_horizon_best_multiple")
    if best is None or rec.get("short_horizon_best_lr") is None:
        raise UpstreamError(
            f"{rec['_path']}: the probe has no finite short-horizon optimum (every probe "
            "destabilised); run it with lower probe.multiples, or use y_from=rule"
        )
    if optimum_at_lowest_multiple(rec):
        multiples = sorted(float(p["multiple"]) for p in rec["probes"])
        raise UpstreamError(
            f"{rec['_path']}: the probe's lowest final loss is at its lowest multiple "
            f"({float(best):g}x), so the optimum may lie below it; run the probe again with lower "
            f"multiples (e.g. probe.multiples=[{multiples[0] / 4:g},{multiples[0] / 2:g},"
            f"{','.join(f'{m:g}' for m in multiples)}]), or use y_from=rule"
        )
    which = f"seed {seed}" if same else f"the newest, no probe of seed {seed}"
    return Upstream(float(rec["short_horizon_best_lr"]), [rec], f"stability probe ({which})")


def find_small_batch(
    study_dir: str, seed: int, compat_key: str, wait_seconds: float = 0.0
) -> Upstream:
    """y and B_small for large_batch: the completed small_batch record of the same seed, else the median."""
    usable = _candidates(
        study_dir, "small_batch", "completed", compat_key, seed, wait_seconds, None
    )
    if not usable:
        raise UpstreamError(
            f"study.dir={study_dir}: no completed small_batch record for this model and data; run "
            "`python -m batchsize_study experiment=small_batch` first (same study.dir), or give lr=<number>"
        )
    sizes = {r.get("batch_size") for r in usable}
    same = [r for r in usable if r.get("seed") == seed]
    if not same and len(sizes) > 1:
        raise UpstreamError(
            f"study.dir={study_dir}: small_batch records with different batch sizes {sorted(sizes)} and none with "
            f"seed={seed}; run small_batch with seed={seed}, or give lr=<number>"
        )
    return _choose(usable, seed, "lr")


def check_step_budget(
    small: dict[str, Any], max_steps: int, warmup_steps: int, allow: bool
) -> None:
    """The comparison is at equal optimizer steps: refuse a different budget unless allowed."""
    for key, mine in (("max_steps", max_steps), ("warmup_steps", warmup_steps)):
        theirs = small.get(key)
        if theirs is not None and theirs != mine and not allow:
            raise ConfigError(
                key,
                mine,
                f"the small_batch run used {key}={theirs}; use {key}={theirs} so both are compared at equal "
                "optimizer steps, or allow_step_mismatch=true to compare anyway (recorded)",
            )


# ---------------------------------------------------------------- the x -> y -> z chain


@dataclass
class LRChoice:
    """The peak LR of a run, where it came from (``lr_source``), and what it was derived from."""

    peak_lr: float
    source: str
    derivation: dict[str, Any]


def derive_lr(c: Config, sdir: str, key: str) -> LRChoice:
    """The peak LR of this run: given (superconvergence, probes, an explicit ``lr``) or derived
    from the study's records (small_batch: y = lr_factor * x; large_batch: z = y (B/B_small)^alpha)."""
    extra: dict[str, Any] = {}
    stage = STAGES[c.task]
    if stage.needs is None:  # superconvergence, probes, sweep points: the LR is given
        return LRChoice(float(c.lr), stage.lr_rule, extra)  # type: ignore[arg-type]
    if stage.name == SMALL_BATCH:
        if c.lr is not None:
            return LRChoice(c.lr, "given: lr on the command line/config", extra)
        if c.y_from == "probe":
            pr = find_probe_optimum(sdir, c.seed, key, c.batch_size, c.upstream_wait_seconds)
            rec = pr.records[-1]
            x = float(rec["unstable_lr"])
            extra.update(
                unstable_lr=x,
                lr_factor=pr.value / x,  # the factor the probe measured, in the rule's terms
                upstream=pr.paths,
                x_runs=1,
                y_from="probe",
            )
            return LRChoice(
                pr.value,
                f"derived: y = the probe's short-horizon optimum = {pr.value / x:g} * x, x = "
                f"{x:.6g} ({pr.selection}) from {', '.join(pr.paths)}",
                extra,
            )
        up = find_unstable_lr(sdir, c.seed, key, c.batch_size, c.upstream_wait_seconds, c.x_from)
        y = small_batch_lr(up.value, c.lr_factor)
        extra.update(
            unstable_lr=up.value,
            lr_factor=c.lr_factor,
            upstream=up.paths,
            x_runs=len(up.records),  # how many superconvergence runs x rests on
            x_from=c.x_from,
        )
        return LRChoice(
            y,
            f"derived: y = {c.lr_factor} * x, x = {up.value:.6g} ({up.selection}) from {', '.join(up.paths)}",
            extra,
        )
    # large_batch
    try:
        small_up: Upstream | None = find_small_batch(sdir, c.seed, key, c.upstream_wait_seconds)
    except UpstreamError:
        if c.lr is None:
            raise
        small_up = None
    if small_up is not None:
        small = small_up.records[-1]
        check_step_budget(small, c.max_steps, c.warmup_steps, c.allow_step_mismatch)
        xs = [float(r["unstable_lr"]) for r in small_up.records if r.get("unstable_lr")]
        extra.update(
            small_batch_size=int(small["batch_size"]),
            small_lr=small_up.value,
            small_max_steps=small.get("max_steps"),
            small_warmup_steps=small.get("warmup_steps"),
            unstable_lr=median(xs) if xs else None,
            lr_scaling_alpha=c.lr_scaling.alpha,
            upstream=small_up.paths,
        )
    if c.lr is not None:
        return LRChoice(c.lr, "given: lr on the command line/config", extra)
    assert small_up is not None
    b_small = extra["small_batch_size"]
    if c.batch_size == b_small:
        log.warning(
            "large_batch has the same batch_size=%d as the small run; the comparison is void",
            c.batch_size,
        )
    z = large_batch_lr(small_up.value, b_small, c.batch_size, c.lr_scaling.alpha)
    source = (
        f"derived: z = y * (B_large/B_small)^alpha = {small_up.value:.6g} * ({c.batch_size}/{b_small})"
        f"^{c.lr_scaling.alpha} ({small_up.selection}) from {', '.join(small_up.paths)}"
    )
    return LRChoice(z, source, extra)


def precheck_upstream(c: Config, sdir: str) -> None:
    """Refuse at once, before the corpus is prepared, when the record this run derives its LR
    from cannot exist: no superconvergence record at all (small_batch), no small_batch record
    (large_batch). Which record matches model and corpus is decided after preparation."""
    if c.lr is not None or c.upstream_wait_seconds > 0:
        return
    needs = STAGES[c.task].needs
    if needs is None:
        return
    record, run = needs, needs
    if c.task == SMALL_BATCH and c.y_from == "probe":
        record, run = PROBE_SUMMARY, STABILITY_PROBE
    if not read_records(sdir, record):
        raise UpstreamError(
            f"study.dir={sdir}: no {record} record; run `python -m batchsize_study "
            f"experiment={run}` first (same study.dir), or give lr=<number>"
        )
