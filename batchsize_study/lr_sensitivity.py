"""Final loss against peak LR: the grid, the best LR and the empirical stability cliff (pure).

An LR-sensitivity curve (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
training instabilities", fig. 1) trains the same model, data and schedule at a log grid of peak LRs
and plots the final loss against LR. Two readings of it are used by the study:

* the **best LR**: the grid LR with the lowest final loss (mean over seeds). A tie goes to the
  lower LR.
* the **stability cliff**: the largest LR whose final loss is still within noise of the best,
  reached from the best by steps up the grid that all stay within noise (an isolated lucky LR
  above a broken one does not move the cliff). A non-finite or diverged run is never within
  noise. ``cliff_upper_lr``, the next grid LR, brackets where training breaks; when the cliff is
  the top of the grid the true cliff may lie higher (``cliff_at_grid_edge``).

*Within noise*: ``L(lr) - L(best) <= sigmas * sqrt(se(lr)^2 + se(best)^2)``. How ``se`` is
estimated, in order of preference (the summary names the one used):

1. ``seeds``: with two or more seeds per LR, the spread of the final loss across seeds. The
   per-LR variances are pooled over all LRs with a finite loss (a 2-3-seed variance alone is too
   noisy), and ``se(lr) = sqrt(pooled_var / n_seeds(lr))``.
2. ``train_window``: with one seed, the standard error of the mean training loss over the last
   ``final_window`` steps (std / sqrt(window)): each step sees a fresh batch, so this is the
   sampling noise of the final loss level. It is a lower bound of the seed-to-seed spread (it
   leaves out the initialisation and data-order luck), so one-seed cliffs are, if anything,
   placed conservatively low.
3. ``none``: neither is available; ``se = 0`` and only exact ties count as within noise.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from batchsize_study.metrics import METRICS, read_metrics
from batchsize_study.study import beside
from batchsize_study.study.stages import LR_SWEEP_SUMMARY

SUMMARY = LR_SWEEP_SUMMARY
"""The experiment name of an LR sweep's summary record."""


def sweep_lrs(
    multiples: list[float], lrs: list[float] | None, x: float | None, snap: bool
) -> list[tuple[float, float | None]]:
    """The grid as sorted, distinct ``(lr, multiple asked for)`` pairs.

    ``lrs`` (absolute) wins over ``multiples`` of x. ``snap`` rounds each LR to the nearest power
    of 2, so sweeps anchored at different x share their grid points (and so their runs).
    """
    if lrs is not None:
        asked: list[tuple[float, float | None]] = [(float(v), None) for v in lrs]
    else:
        if x is None or not math.isfinite(x) or x <= 0:
            raise ValueError("multiples of x need a positive, finite x")
        asked = [(float(m) * x, float(m)) for m in multiples]
    out: dict[float, float | None] = {}
    for lr, m in asked:
        key = 2.0 ** round(math.log2(lr)) if snap else lr
        out.setdefault(key, m)
    return sorted(out.items())


def window_se(losses: list[float], window: int) -> float | None:
    """Standard error of the mean of the last ``window`` losses; None when undefined."""
    tail = losses[-window:]
    if len(tail) < 2 or any(not math.isfinite(v) for v in tail):
        return None
    return statistics.stdev(tail) / math.sqrt(len(tail))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def summarise(points: list[dict[str, Any]], sigmas: float = 2.0) -> dict[str, Any]:
    """Best LR and cliff of one batch size's sweep (definitions: module docstring).

    ``points``: one dict per run with ``lr``, ``final_loss`` (None, NaN or inf for a run that
    diverged or has no loss), optional ``seed``, ``diverged`` and ``train_se``. Returns ``per_lr``
    rows (lr, n, mean, se, within_noise), ``best_lr``, ``best_loss``, ``cliff_lr``,
    ``cliff_upper_lr``, edge flags and ``noise_method``. JSON-ready: no inf or NaN.
    """
    by_lr: dict[float, list[dict[str, Any]]] = {}
    for p in points:
        by_lr.setdefault(float(p["lr"]), []).append(p)
    rows: list[dict[str, Any]] = []
    for lr in sorted(by_lr):
        ps = by_lr[lr]
        losses = [p.get("final_loss") for p in ps]
        broken = any(p.get("diverged") for p in ps) or not all(_finite(v) for v in losses)
        mean = None if broken else statistics.fmean(float(v) for v in losses)  # type: ignore[arg-type]
        var = statistics.variance(losses) if (not broken and len(ps) >= 2) else None  # type: ignore[type-var]
        tses = [p.get("train_se") for p in ps if _finite(p.get("train_se"))]
        rows.append(
            {
                "lr": lr,
                "n": len(ps),
                "mean": mean,
                "seed_var": var,
                "train_se": statistics.fmean(tses) / math.sqrt(len(ps)) if tses else None,
                "diverged": broken,
                "seeds": [p.get("seed") for p in ps],
                "losses": [float(v) if _finite(v) else None for v in losses],
            }
        )
    seed_vars = [r["seed_var"] for r in rows if r["seed_var"] is not None]
    if seed_vars:
        pooled = statistics.fmean(seed_vars)
        method = f"seeds: across-seed variance pooled over {len(seed_vars)} LRs"
        for r in rows:
            r["se"] = math.sqrt(pooled / r["n"]) if r["mean"] is not None else None
    elif any(r["train_se"] is not None for r in rows):
        method = "train_window: standard error of the mean training loss over the last steps"
        for r in rows:
            r["se"] = r["train_se"] if r["mean"] is not None else None
    else:
        method = (
            "none: no seeds to compare and no per-step losses; only exact ties are within noise"
        )
        for r in rows:
            r["se"] = 0.0 if r["mean"] is not None else None
    for r in rows:
        r.pop("seed_var")
        if r["mean"] is not None and r["se"] is None:
            r["se"] = 0.0
    finite = [r for r in rows if r["mean"] is not None]
    out: dict[str, Any] = {
        "per_lr": rows,
        "sigmas": sigmas,
        "noise_method": method,
        "best_lr": None,
        "best_loss": None,
        "best_se": None,
        "cliff_lr": None,
        "cliff_upper_lr": None,
        "best_at_grid_edge": None,
        "cliff_at_grid_edge": None,
        "n_points": len(points),
    }
    if not finite:
        for r in rows:
            r["within_noise"] = False
        return out
    best = min(finite, key=lambda r: (r["mean"], r["lr"]))  # a tie goes to the lower LR
    for r in rows:
        r["within_noise"] = r["mean"] is not None and (
            r["mean"] - best["mean"] <= sigmas * math.hypot(r["se"], best["se"])
        )
    i = rows.index(best)
    j = i
    while j + 1 < len(rows) and rows[j + 1]["within_noise"]:
        j += 1
    out.update(
        best_lr=best["lr"],
        best_loss=best["mean"],
        best_se=best["se"],
        cliff_lr=rows[j]["lr"],
        cliff_upper_lr=rows[j + 1]["lr"] if j + 1 < len(rows) else None,
        best_at_grid_edge=i in (0, len(rows) - 1),
        cliff_at_grid_edge=j == len(rows) - 1,
    )
    return out


def loss_at(summary: dict[str, Any], lr: float) -> float | None:
    """The swept mean final loss at ``lr`` (None if not on the grid or diverged)."""
    for r in summary["per_lr"]:
        if math.isclose(r["lr"], lr, rel_tol=1e-9):
            return r["mean"]
    return None


def relation(lr: float, ref: float) -> str:
    """'4x above' / '2.5x below' / 'at': where ``lr`` sits relative to ``ref``."""
    ratio = lr / ref
    if math.isclose(ratio, 1.0, rel_tol=0.05):
        return "at"
    return f"{ratio:.3g}x above" if ratio > 1 else f"{1 / ratio:.3g}x below"


def point(rec: dict[str, Any], final_window: int) -> dict[str, Any]:
    """One run record as a sweep point: its final val loss and the one-seed noise estimate."""
    diverged = rec.get("status") != "completed"
    loss = rec.get("final_val_loss")
    kind = "val"
    if loss is None and not diverged:
        loss, kind = rec.get("final_train_loss"), "train"
    # the run's own metrics.csv, beside its record: a moved or copied study reads its own curves
    path = beside(rec, METRICS) if rec.get("_path") else rec.get("metrics_csv")
    losses = read_metrics(path).train_loss.tolist() if path else []
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
    }
