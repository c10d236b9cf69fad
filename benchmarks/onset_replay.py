"""Replay a study's superconvergence run under every onset rule and set each x beside the sweep.

    python benchmarks/onset_replay.py <study.dir> [<study.dir> ...]

For each study: the newest diverged superconvergence record's metrics.csv is fed again through
the detector (``batchsize_study.spike.replay``) under onset = rise | min_loss | plateau, with and without
the EMA lag correction; each x is printed with x / (small-batch sweep cliff) and, where the sweep
has the loss at the grid LR nearest y = x / 2, that loss minus the best swept loss. No training.
Prints one JSON object per study (raw numbers for docs/lr_sweep.md).
"""

from __future__ import annotations

import json
import math
import sys

from batchsize_study.detector import replay
from batchsize_study.report.sweeps import _detector_cfg, read_rows, seed_rule, sweeps
from batchsize_study.study import select


def interpolate_loss(per_lr: list[dict], lr: float) -> float | None:
    """Final loss at ``lr``, linear in log LR between the two neighbouring grid points."""
    ok = [(r["lr"], r["mean"]) for r in per_lr if r["mean"] is not None]
    for (a, la), (b, lb) in zip(ok, ok[1:]):
        if a <= lr <= b:
            t = math.log(lr / a) / math.log(b / a)
            return la + t * (lb - la)
    return None


def main(dirs: list[str]) -> None:
    for d in dirs:
        sel = select(d)
        sc = seed_rule(sel)["sc"]
        sw = sweeps(sel)
        small = sw[min(sw)] if sw else None
        rows = [(int(r["step"]), r["lr"], r["train_loss"]) for r in read_rows(sc)]
        out = {"study": d, "warmup_shape": sc.get("warmup_shape"), "record_x": sc["unstable_lr"]}
        if small:
            out.update(
                small_best_lr=small["best_lr"],
                small_best_loss=small["best_loss"],
                small_cliff_lr=small["cliff_lr"],
                small_cliff_upper_lr=small["cliff_upper_lr"],
                noise=small["noise_method"],
            )
        rules = {}
        for onset in ("rise", "min_loss", "plateau"):
            for lag in (False, True):
                v, _ = replay(rows, _detector_cfg(sc, onset=onset, lag_correction=lag))
                x = v.onset_lr
                entry = {"onset_step": v.onset_step, "x": x, "alarm_step": v.alarm_step}
                if small and x:
                    entry["x_over_cliff"] = x / small["cliff_lr"]
                    y_loss = interpolate_loss(small["per_lr"], x / 2)
                    entry["y_loss_minus_best_interpolated"] = (
                        y_loss - small["best_loss"] if y_loss is not None else None
                    )
                rules[onset + ("+lag" if lag else "")] = entry
        out["rules"] = rules
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
