"""The one selection: which runs of a study the verdict, evaluate, the ladder, the sweep and probe
sections, the wandb summary and the LR marks speak of.

Every consumer asks :func:`select` (or :func:`select_records`); none filters records itself. The
rules, in order:

1. the configuration: the ``compat_key`` (model, data, seq_len) given, else the one of the newest
   completed small_batch run (else of the newest record that has one); runs of another
   configuration are set aside with a note;
2. one run per (experiment, batch size, seed): the newest completed one (a re-run supersedes);
3. the small batch size the large runs derived their LR from is the baseline; each large run is
   paired with the baseline run of its own seed;
4. the ladder's rungs: every selected run at the baseline's step budget, one per (batch, seed);
5. x: the value each compared small run actually used (its record's ``unstable_lr``), and the
   superconvergence records it came from (by run id, so a moved study still matches);
6. sweeps: per batch size, the newest lr_sweep point per (LR, seed) at one step budget, wherever
   it was run (a serial sweep, or grid points as jobs of a multirun);
7. the probe and the test-set evaluation: the newest of this configuration, with a note whenever
   it is not of the runs (or the x) the verdict compares.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchsize_study.study.records import FINAL_STATUSES, read_records, run_name
from batchsize_study.study.stages import (
    EVALUATE,
    LARGE_BATCH,
    LR_SWEEP,
    LR_SWEEP_SUMMARY,
    PROBE_SUMMARY,
    SMALL_BATCH,
    SUPERCONVERGENCE,
)

Record = dict[str, Any]


@dataclass(frozen=True)
class Pair:
    """One seed's small- and large-batch records: compared, and scored on the same windows."""

    seed: int
    small: Record
    large: Record


@dataclass
class Selection:
    """The runs a study's answer rests on (see the module docstring for the rules)."""

    study_dir: Path
    records: list[Record]
    """Every readable record of the study, oldest first."""
    key: str | None
    """The model/data configuration (``compat_key``) selected."""
    small_batch: int | None = None
    """The baseline small batch size."""
    small: dict[int, Record] = field(default_factory=dict)
    """Baseline small_batch runs by seed."""
    large: dict[int, dict[int, Record]] = field(default_factory=dict)
    """large_batch runs by batch size, then seed."""
    rungs: dict[int, dict[int, Record]] = field(default_factory=dict)
    """The ladder: every selected small/large run at the baseline's step budget, by batch, seed."""
    superconvergence: list[Record] = field(default_factory=list)
    """The superconvergence runs x came from (else the newest of this configuration)."""
    sweeps: dict[int, list[Record]] = field(default_factory=dict)
    """lr_sweep point records by batch size (one per LR and seed)."""
    sweep_settings: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Per batch size, the sweep's analysis settings (sigmas, final_window) as last recorded."""
    probe: Record | None = None
    probe_note: str | None = None
    evaluation: Record | None = None
    evaluation_note: str | None = None
    ignored: list[str] = field(default_factory=list)
    """What was left out of the comparison and why, one line each."""

    @property
    def pairs(self) -> list[Pair]:
        """Each large run with the baseline run of its seed, by batch size then seed."""
        return [
            Pair(seed, self.small[seed], r)
            for b in sorted(self.large)
            for seed, r in sorted(self.large[b].items())
            if seed in self.small
        ]

    @property
    def compared(self) -> list[Record]:
        """Every record the verdict compares (each once), small runs first."""
        return models_of(self.pairs)

    @property
    def compared_ids(self) -> set[str]:
        return {run_name(r) for r in self.compared}

    def marks(self) -> dict[str, Any]:
        """x, y and z as the compared runs used them (means over seeds)."""
        smalls = [p.small for p in self.pairs] or list(self.small.values())
        xs = [r.get("unstable_lr") for r in smalls] or []
        if not any(v is not None for v in xs):
            xs = [r.get("unstable_lr") for r in self.superconvergence]
        runs = [(r.get("derivation") or {}).get("x_runs") for r in smalls]
        read_at = [r.get("spike_step") for r in self.superconvergence if r.get("spike_step")]
        return {
            "x_unstable_lr": _mean(xs),
            "x_runs": max((n for n in runs if n), default=None),
            # the horizon x was read at (the onset step of the superconvergence runs) and the one
            # the compared runs train for: a much longer run may break below x
            "x_read_at_step": max(read_at, default=None),
            "planned_steps": max(
                (int(r["max_steps"]) for r in smalls if r.get("max_steps")), default=None
            ),
            "y_small_lr": _mean([r.get("lr") for r in self.small.values()]),
            "z_large_lr": {
                b: _mean([r.get("lr") for r in g.values()]) for b, g in self.large.items()
            },
        }


def models_of(pairs: list[Pair]) -> list[Record]:
    """Each record of the pairs once (a small run pairs with every large batch size), small
    runs first: what evaluate scores and what the verdict compares."""
    seen: dict[str, Record] = {}
    for p in sorted(pairs, key=lambda p: p.seed):
        seen.setdefault(run_name(p.small), p.small)
    for p in pairs:
        seen.setdefault(run_name(p.large), p.large)
    return list(seen.values())


def _mean(vals: list[Any]) -> float | None:
    v = [float(a) for a in vals if a is not None]
    return sum(v) / len(v) if v else None


def upstream_ids(rec: Record) -> list[str]:
    """The run ids a record derived its LR from (its ``derivation.upstream`` folders)."""
    ups = (rec.get("derivation") or {}).get("upstream") or []
    return [Path(p).parent.name for p in ups]


def _latest(recs: list[Record], key: Any, ignored: list[str]) -> dict[Any, Record]:
    """The newest record per key (records come oldest first); the others noted as superseded."""
    out: dict[Any, Record] = {}
    for r in recs:
        k = key(r)
        if k in out:
            ignored.append(f"{run_name(out[k])}: superseded by {run_name(r)}")
        out[k] = r
    return out


def select(study_dir: str | os.PathLike, compat_key: str | None = None) -> Selection:
    """The selection of the study folder ``study_dir`` (records read once)."""
    sdir = Path(study_dir)
    return select_records(read_records(sdir), sdir, compat_key)


def select_records(
    records: list[Record], study_dir: str | os.PathLike, compat_key: str | None = None
) -> Selection:
    """The selection from already-read records (oldest first); pure."""
    ignored: list[str] = []
    done = [
        r
        for r in records
        if r.get("experiment") in (SMALL_BATCH, LARGE_BATCH) and r.get("status") == "completed"
    ]
    for r in records:
        if r.get("experiment") in (SMALL_BATCH, LARGE_BATCH) and r.get("status") != "completed":
            ignored.append(f"{run_name(r)}: {r['experiment']}, status {r.get('status')}")
    key = compat_key
    if key is None:
        smalls_done = [r for r in done if r["experiment"] == SMALL_BATCH]
        keyed = [r for r in records if r.get("compat_key")]  # a study of probes or sweeps only
        key = (smalls_done or done or keyed or [{}])[-1].get("compat_key")
    sel = Selection(Path(study_dir), records, key, ignored=ignored)
    usable = []
    for r in done:
        if r.get("compat_key") == key:
            usable.append(r)
        else:
            ignored.append(f"{run_name(r)}: another model/data configuration")
    latest = _latest(
        usable, lambda r: (r["experiment"], int(r["batch_size"]), int(r.get("seed", 0))), ignored
    )
    smalls = [r for k, r in latest.items() if k[0] == SMALL_BATCH]
    larges = [r for k, r in latest.items() if k[0] == LARGE_BATCH]
    if smalls:
        derived = [(r.get("derivation") or {}).get("small_batch_size") for r in larges]
        sizes = sorted({int(r["batch_size"]) for r in smalls})
        count = Counter(int(r["batch_size"]) for r in smalls)
        base = max(sizes, key=lambda b: (derived.count(b), count[b]))
        sel.small_batch = base
        sel.small = {int(r.get("seed", 0)): r for r in smalls if int(r["batch_size"]) == base}
        for r in smalls:
            if int(r["batch_size"]) != base:
                ignored.append(
                    f"{run_name(r)}: small batch {r['batch_size']}, the large runs derive from {base}"
                )
    for r in sorted(larges, key=lambda r: (int(r["batch_size"]), int(r.get("seed", 0)))):
        b, seed = int(r["batch_size"]), int(r.get("seed", 0))
        if b == sel.small_batch:
            ignored.append(f"{run_name(r)}: large_batch at the small batch size {b}")
            continue
        sel.large.setdefault(b, {})[seed] = r
        if sel.small and seed not in sel.small:
            ignored.append(
                f"{run_name(r)}: no small_batch run (batch {sel.small_batch}) with seed {seed}"
            )
        up = upstream_ids(r)
        if seed in sel.small and up and run_name(sel.small[seed]) not in up:
            ignored.append(
                f"{run_name(r)}: note: its z derives from {', '.join(up)}, not from the compared "
                f"small run {run_name(sel.small[seed])} (re-run large_batch to derive it anew)"
            )
    large_seeds = {s for g in sel.large.values() for s in g}
    for seed, r in sorted(sel.small.items()):
        if sel.large and seed not in large_seeds:
            ignored.append(f"{run_name(r)}: no large_batch run with seed {seed}")

    _rungs(sel, latest, ignored)
    _superconvergence(sel, records)
    _sweeps(sel, records, ignored)
    _probe(sel, records)
    _evaluation(sel, records)
    return sel


def _rungs(sel: Selection, latest: dict[Any, Record], ignored: list[str]) -> None:
    budgets = [r.get("max_steps") for r in sel.small.values()] or [
        r.get("max_steps") for r in latest.values()
    ]
    if not budgets:
        return
    budget = Counter(budgets).most_common(1)[0][0]
    for r in latest.values():  # oldest first: a later run of (batch, seed) wins
        if r.get("max_steps") != budget:
            ignored.append(
                f"{run_name(r)}: not on the ladder (max_steps={r.get('max_steps')}, the "
                f"ladder's budget is {budget})"
            )
            continue
        sel.rungs.setdefault(int(r["batch_size"]), {})[int(r.get("seed", 0))] = r


def _superconvergence(sel: Selection, records: list[Record]) -> None:
    used = {u for r in sel.small.values() for u in upstream_ids(r)}
    sc = [r for r in records if r.get("experiment") == SUPERCONVERGENCE]
    chosen = [r for r in sc if run_name(r) in used]
    if not chosen:
        mine = [r for r in sc if r.get("compat_key") in (sel.key, None)]
        chosen = list(_latest(mine, lambda r: (r.get("batch_size"), r.get("seed")), []).values())
    sel.superconvergence = chosen


def _sweeps(sel: Selection, records: list[Record], ignored: list[str]) -> None:
    points = [
        r
        for r in records
        if r.get("experiment") == LR_SWEEP
        and r.get("compat_key") == sel.key
        and r.get("status") in (*FINAL_STATUSES, "failed")
    ]
    base_budget = next((r.get("max_steps") for r in sel.small.values()), None)
    for b in sorted({int(r["batch_size"]) for r in points}):
        mine = [r for r in points if int(r["batch_size"]) == b]
        budgets = {r.get("max_steps") for r in mine}
        budget = base_budget if base_budget in budgets else mine[-1].get("max_steps")
        for r in mine:
            if r.get("max_steps") != budget:
                ignored.append(f"{run_name(r)}: sweep point at max_steps={r.get('max_steps')}")
        at = [r for r in mine if r.get("max_steps") == budget]
        pts = _latest(at, lambda r: (f"{float(r['lr']):.6g}", r.get("seed")), ignored)
        sel.sweeps[b] = sorted(pts.values(), key=lambda r: (float(r["lr"]), r.get("seed") or 0))
    for rec in records:  # the newest summary's settings win
        if rec.get("experiment") == LR_SWEEP_SUMMARY and rec.get("batch_size") in sel.sweeps:
            sel.sweep_settings[int(rec["batch_size"])] = {
                "sigmas": rec.get("sigmas", 2.0),
                "final_window": (rec.get("sweep") or {}).get("final_window"),
            }
    for r in sel.sweeps.values():
        for p in r:
            s = (p.get("derivation") or {}).get("sweep_settings")
            if s:  # a point records the settings it was run with
                sel.sweep_settings.setdefault(int(p["batch_size"]), dict(s))


def _probe(sel: Selection, records: list[Record]) -> None:
    probes = [
        r
        for r in records
        if r.get("experiment") == PROBE_SUMMARY and r.get("compat_key") in (sel.key, None)
    ]
    if not probes:
        return
    sel.probe = probes[-1]
    xs = {f"{float(r['unstable_lr']):.6g}" for r in sel.small.values() if r.get("unstable_lr")}
    px = sel.probe.get("unstable_lr")
    if xs and px is not None and f"{float(px):.6g}" not in xs:
        sel.probe_note = (
            f"This probe ({run_name(sel.probe)}) tested x = {float(px):.4g}; the compared small "
            f"runs used x = {', '.join(sorted(xs))}. Run `experiment=stability_probe` again "
            "to probe the x the verdict rests on."
        )


def _evaluation(sel: Selection, records: list[Record]) -> None:
    evals = [
        r
        for r in records
        if r.get("experiment") == EVALUATE
        and r.get("status") == "completed"
        and r.get("compat_key") == sel.key
    ]
    if not evals:
        return
    want = sel.compared_ids

    def scored(r: Record) -> set[str]:
        return {str(m.get("run_id")) for m in r.get("models") or []}

    exact = [r for r in evals if scored(r) == want]
    if exact:
        sel.evaluation = exact[-1]
        return
    sel.evaluation = evals[-1]
    have = scored(sel.evaluation)
    if want and want <= have:
        sel.evaluation_note = (
            f"This test-set evaluation ({run_name(sel.evaluation)}) also scored runs the verdict "
            f"does not compare ({', '.join(sorted(have - want))}); its comparisons below include "
            "them. Run `experiment=evaluate` again (same study.dir) to score the compared runs alone."
        )
        return
    sel.evaluation_note = (
        f"This test-set evaluation ({run_name(sel.evaluation)}) scored other runs than the "
        f"verdict compares: it scored {', '.join(sorted(have - want)) or 'none of them'}; not "
        f"scored: {', '.join(sorted(want - have)) or 'none'}. Run `experiment=evaluate` "
        "again (same study.dir) to score the compared runs."
    )
