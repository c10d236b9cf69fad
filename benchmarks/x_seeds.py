"""x over seeds, and x as the median of several superconvergence runs (issue 21, item 1c and 2).

    python benchmarks/x_seeds.py <sweep summary json or study dir> <superconvergence record json or study dir> ...

Reads every diverged superconvergence record given (a result.json, or every one under a study's
runs/), and the small batch's LR sweep: a sweep summary record, or a study directory, whose sweep
points are selected as the report selects them (every lr_sweep point of the study, newest per
LR and seed, across sweep commands; with several seeds the noise is the across-seed one). Prints,
per seed, x, x / cliff and the loss at y = x/2 minus the best swept loss (linear in log LR between
the two neighbouring grid points, as benchmarks/onset_replay.py), then the same for the median x of
every subset of ``--repeats`` seeds (what ``x_from=median`` over that many runs would give). No
training. One JSON object on the last line (raw numbers for docs/lr_sweep.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from onset_replay import interpolate_loss

from batchsize_study.lr_sensitivity import summarise
from batchsize_study.report.sweeps import sweeps
from batchsize_study.study import select


def _records(paths: list[str]) -> dict[int, float]:
    xs: dict[int, float] = {}
    for p in map(Path, paths):
        files = sorted(p.glob("runs/*/result.json")) if p.is_dir() else [p]
        for f in files:
            r = json.loads(f.read_text())
            if r.get("experiment") == "superconvergence" and r.get("status") == "diverged":
                xs[int(r["seed"])] = float(r["unstable_lr"])
    return dict(sorted(xs.items()))


def _load_sweep(paths: list[str], batch_size: int) -> dict:
    """One sweep's analysis from the points of summary records and/or study directories (a point
    of a later path replaces an earlier one at the same LR and seed: a grid extended later)."""
    points: dict[tuple[float, object], dict] = {}
    sigmas = 2.0
    for path in paths:
        if Path(path).is_dir():
            s = sweeps(select(path))[batch_size]
        else:
            s = json.loads(Path(path).read_text())
        sigmas = s.get("sigmas", sigmas)
        points.update({(float(q["lr"]), q.get("seed")): q for q in s["points"]})
    return summarise(list(points.values()), sigmas)


def _row(x: float, sweep: dict, large: dict | None, ratio: float) -> dict:
    """x against the small batch's sweep; with the large batch's sweep, also the seed rule's
    per-step verdict (large at z = (x/2) sqrt(ratio), Krizhevsky 2014 / Malladi et al. 2022's
    square-root rule for Adam, minus small at y = x/2, both read off the sweeps in log LR) against
    the tuned one (each batch at its best swept LR, Shallue et al. 2018)."""
    y_loss = interpolate_loss(sweep["per_lr"], x / 2)
    row = {
        "x": x,
        "x_over_cliff": x / sweep["cliff_lr"],
        "y_loss_minus_best": None if y_loss is None else y_loss - sweep["best_loss"],
    }
    if large is not None:
        z_loss = interpolate_loss(large["per_lr"], x / 2 * ratio**0.5)
        rule = None if z_loss is None or y_loss is None else z_loss - y_loss
        tuned = large["best_loss"] - sweep["best_loss"]
        row.update(
            seed_rule_diff=rule,
            tuned_diff=tuned,
            survives=None if rule is None else (rule < 0) == (tuned < 0),
        )
    return row


def _fmt(v: float | None, spec: str = "+.3f") -> str:
    return "off the grid" if v is None else format(v, spec)


def _line(label: object, r: dict) -> str:
    out = f"{label} | {r['x']:.5f} | {r['x_over_cliff']:.2f} | {_fmt(r['y_loss_minus_best'])}"
    if "tuned_diff" in r:
        out += f" | {_fmt(r['seed_rule_diff'])} | {r['tuned_diff']:+.3f} | {r['survives']}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="the small batch's lr_sweep_summary record (JSON) or a study dir")
    ap.add_argument("--batch-size", type=int, default=16, help="whose sweep, for a study dir")
    ap.add_argument(
        "--also",
        action="extend",
        nargs="+",
        default=[],
        help="more of the small batch's sweep (summaries or study dirs): one grid run in parts",
    )
    ap.add_argument(
        "--large",
        action="append",
        help="the large batch's sweep (summary or study dir; repeatable): the verdicts",
    )
    ap.add_argument("--large-batch-size", type=int, default=64)
    ap.add_argument("records", nargs="+", help="superconvergence result.json files or study dirs")
    ap.add_argument("--repeats", type=int, default=3, help="runs per median x")
    a = ap.parse_args()
    sweep = _load_sweep([a.sweep, *a.also], a.batch_size)
    large = _load_sweep(a.large, a.large_batch_size) if a.large else None
    ratio = a.large_batch_size / a.batch_size
    xs = _records(a.records)
    for name, s in (("small", sweep), ("large", large)):
        if s is not None:
            print(
                f"{name}-batch sweep: best LR {s['best_lr']:.4g} (loss {s['best_loss']:.4f}), "
                f"cliff {s['cliff_lr']:.4g}, next grid LR {s['cliff_upper_lr']}; "
                f"noise: {s['noise_method']}"
            )
    head = "x | x / cliff | loss at y = x/2 minus best"
    if large is not None:
        head += " | seed rule: large at z - small at y | tuned: best - best | same sign"
    print(f"\nseed | {head}")
    per_seed = {}
    for seed, x in xs.items():
        per_seed[seed] = r = _row(x, sweep, large, ratio)
        print(_line(seed, r))
    ratios = [r["x_over_cliff"] for r in per_seed.values()]
    print(f"one seed: x / cliff {min(ratios):.2f} .. {max(ratios):.2f} over {len(xs)} seeds")
    subsets = {}
    print(f"\nmedian of {a.repeats} seeds | {head}")
    for combo in itertools.combinations(xs, a.repeats):
        x = statistics.median(xs[s] for s in combo)
        subsets[",".join(map(str, combo))] = r = _row(x, sweep, large, ratio)
        print(_line(combo, r))
    if subsets:
        med = [r["x_over_cliff"] for r in subsets.values()]
        gaps = [g for r in subsets.values() if (g := r["y_loss_minus_best"]) is not None]
        print(
            f"median of {a.repeats}: x / cliff {min(med):.2f} .. {max(med):.2f} over "
            f"{len(subsets)} subsets; loss at y minus best "
            + (f"{min(gaps):+.3f} .. {max(gaps):+.3f}" if gaps else "off the grid")
        )
    print(json.dumps({"per_seed": per_seed, f"median_of_{a.repeats}": subsets}))


if __name__ == "__main__":
    main()
