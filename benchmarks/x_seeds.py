"""x over seeds, and x as the median of several superconvergence runs (issue 21, item 1c and 2).

    python benchmarks/x_seeds.py <sweep summary json> <superconvergence record json or study dir> ...

Reads every diverged superconvergence record given (a result.json, or every one under a study's
runs/), and the small batch's LR-sweep summary (its per-LR final losses, best LR and cliff). Prints,
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


def _records(paths: list[str]) -> dict[int, float]:
    xs: dict[int, float] = {}
    for p in map(Path, paths):
        files = sorted(p.glob("runs/*/result.json")) if p.is_dir() else [p]
        for f in files:
            r = json.loads(f.read_text())
            if r.get("experiment") == "superconvergence" and r.get("status") == "diverged":
                xs[int(r["seed"])] = float(r["unstable_lr"])
    return dict(sorted(xs.items()))


def _row(x: float, sweep: dict) -> dict:
    y_loss = interpolate_loss(sweep["per_lr"], x / 2)
    return {
        "x": x,
        "x_over_cliff": x / sweep["cliff_lr"],
        "y_loss_minus_best": None if y_loss is None else y_loss - sweep["best_loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="the small batch's lr_sweep_summary record (JSON)")
    ap.add_argument("records", nargs="+", help="superconvergence result.json files or study dirs")
    ap.add_argument("--repeats", type=int, default=3, help="runs per median x")
    a = ap.parse_args()
    rec = json.loads(Path(a.sweep).read_text())
    sweep = {**rec, **summarise(rec["points"], rec.get("sigmas", 2.0))}
    xs = _records(a.records)
    print(
        f"small-batch sweep: best LR {sweep['best_lr']:.4g} (loss {sweep['best_loss']:.4f}), "
        f"cliff {sweep['cliff_lr']:.4g}, next grid LR {sweep['cliff_upper_lr']}"
    )
    print("\nseed | x | x / cliff | loss at y = x/2 minus best")
    per_seed = {}
    for seed, x in xs.items():
        per_seed[seed] = r = _row(x, sweep)
        print(f"{seed} | {x:.5f} | {r['x_over_cliff']:.2f} | {r['y_loss_minus_best']:+.3f}")
    ratios = [r["x_over_cliff"] for r in per_seed.values()]
    print(f"one seed: x / cliff {min(ratios):.2f} .. {max(ratios):.2f} over {len(xs)} seeds")
    subsets = {}
    print(f"\nmedian of {a.repeats} seeds | x | x / cliff | loss at y = x/2 minus best")
    for combo in itertools.combinations(xs, a.repeats):
        x = statistics.median(xs[s] for s in combo)
        subsets[",".join(map(str, combo))] = r = _row(x, sweep)
        print(f"{combo} | {x:.5f} | {r['x_over_cliff']:.2f} | {r['y_loss_minus_best']:+.3f}")
    med = [r["x_over_cliff"] for r in subsets.values()]
    gaps = [r["y_loss_minus_best"] for r in subsets.values()]
    print(
        f"median of {a.repeats}: x / cliff {min(med):.2f} .. {max(med):.2f} over {len(subsets)} "
        f"subsets; loss at y minus best {min(gaps):+.3f} .. {max(gaps):+.3f}"
    )
    print(json.dumps({"per_seed": per_seed, f"median_of_{a.repeats}": subsets}))


if __name__ == "__main__":
    main()
