"""The batch-size ladder: loss at a step, and steps to a target loss, against batch size.

``python -m batchsize_study -m experiment=large_batch batch_size=32,64,128,...`` (after the
small_batch run) gives one rung per batch size, all at the same optimizer-step budget. Shallue et
al. 2018 ("Measuring the Effects of Data Parallelism on Neural Network Training") read such a
ladder as steps-to-target against batch size, in three regimes: perfect scaling (doubling the
batch halves the steps), diminishing returns, and maximal data parallelism (no fewer steps).
McCandlish et al. 2018 model the curve as S = S_min (1 + B_crit / B) (their eq. 2.11 with
E = B S); the fitted B_crit is the empirical critical batch, shown next to the gradient noise
scale B_simple the runs measured (batchsize_study.noise).

Caveat, stated in the report: each rung's LR comes from the study's rule (z = y (B/B_small)^alpha),
not from a per-batch tuning as in Shallue et al., and the cosine decay is tied to the step budget.

Entry point for the report: :func:`ladder_section`.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from batchsize_study.study import read_records

SMOOTHING = 0.9  # EMA factor of the training loss, as the detector's default (~10 steps)
PERFECT, MAXIMAL = 0.8, 0.2  # log-speedup efficiency thresholds between Shallue's regimes


# ---------------------------------------------------------------- pure functions


def smooth(losses: list[float], factor: float = SMOOTHING) -> list[float]:
    """Bias-corrected EMA (as Lightning's LR finder and our detector smooth the loss)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses, 1):
        avg = factor * avg + (1 - factor) * v
        out.append(avg / (1 - factor**i))
    return out


def steps_to_target(steps: list[int], smoothed: list[float], target: float) -> int | None:
    """The first optimizer step whose smoothed loss is at or below ``target``; None if never."""
    for s, v in zip(steps, smoothed):
        if math.isfinite(v) and v <= target:
            return s
    return None


def fit_critical_batch(batch_sizes: list[float], steps: list[float]) -> dict[str, float] | None:
    """Least squares of S = S_min + (S_min B_crit) / B (McCandlish et al. 2018, eq. 2.11).

    Linear in 1/B: S = a + b/B with a = S_min, b = S_min B_crit, so B_crit = b / a. Needs two
    distinct batch sizes; None when the fit is degenerate or non-physical (a <= 0 or b < 0).
    """
    pts = [(1.0 / b, s) for b, s in zip(batch_sizes, steps) if s is not None]
    if len({p[0] for p in pts}) < 2:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    a = my - b * mx
    if a <= 0 or b < 0:
        return None
    return {"s_min": a, "b_crit": b / a}


def regime(b_lo: float, s_lo: float, b_hi: float, s_hi: float) -> tuple[float, str]:
    """(efficiency, regime) of one rung step: efficiency = log(S_lo/S_hi) / log(B_hi/B_lo), 1
    when doubling the batch halves the steps (Shallue et al. 2018, perfect scaling), 0 when it
    saves none (maximal data parallelism)."""
    eff = math.log(s_lo / s_hi) / math.log(b_hi / b_lo)
    if eff >= PERFECT:
        return eff, "perfect scaling"
    if eff <= MAXIMAL:
        return eff, "maximal data parallelism"
    return eff, "diminishing returns"


def critical_batch_verdict(batch_size: float, critical: float | None) -> str:
    """'below' / 'near' / 'above' the critical batch (within a factor of 2 counts as near)."""
    if critical is None or not math.isfinite(critical) or critical <= 0:
        return "unknown"
    if batch_size < critical / 2:
        return "below"
    if batch_size > critical * 2:
        return "above"
    return "near"


def read_curve(metrics_csv: str | Path) -> tuple[list[int], list[float]]:
    """(steps, train losses) of a run's metrics.csv, validation rows skipped."""
    steps, losses = [], []
    p = Path(metrics_csv)
    if not p.exists():
        return steps, losses
    with p.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("train_loss"):
                steps.append(int(float(row["step"])))
                losses.append(float(row["train_loss"]))
    return steps, losses


# ---------------------------------------------------------------- the study's ladder


def ladder_data(study_dir: str | Path, target: float | None = None) -> dict[str, Any]:
    """The rungs of the study (completed small_batch + large_batch runs of one model/data and one
    step budget), their curves averaged over seeds, the two readings and the fit."""
    recs = [
        r
        for r in read_records(study_dir)
        if r.get("experiment") in ("small_batch", "large_batch") and r.get("status") == "completed"
    ]
    if not recs:
        return {"rungs": [], "note": "no completed small_batch/large_batch runs"}
    key, _ = Counter((r.get("compat_key"), r.get("max_steps")) for r in recs).most_common(1)[0]
    recs = [r for r in recs if (r.get("compat_key"), r.get("max_steps")) == key]
    by_batch: dict[int, list[dict[str, Any]]] = {}
    for r in recs:
        by_batch.setdefault(int(r["batch_size"]), []).append(r)
    rungs = []
    for b in sorted(by_batch):
        # metrics.csv next to its result.json: a moved or copied study still reads.
        curves = [read_curve(Path(r["_path"]).with_name("metrics.csv")) for r in by_batch[b]]
        curves = [c for c in curves if c[0]]
        if not curves:
            continue
        n = min(len(c[0]) for c in curves)
        steps = curves[0][0][:n]
        sm = [smooth(c[1][:n]) for c in curves]
        mean = [statistics.fmean(v[i] for v in sm) for i in range(n)]
        gns = [r["gradient_noise_scale"] for r in by_batch[b] if r.get("gradient_noise_scale")]
        rungs.append(
            {
                "batch_size": b,
                "runs": [r["run_id"] for r in by_batch[b]],
                "experiments": sorted({r["experiment"] for r in by_batch[b]}),
                "lr": statistics.fmean(float(r["lr"]) for r in by_batch[b]),
                "steps": steps,
                "smoothed_loss": mean,
                "final_val_loss": _mean_or_none([r.get("final_val_loss") for r in by_batch[b]]),
                "gradient_noise_scale": statistics.median(gns) if gns else None,
            }
        )
    if not rungs:
        return {"rungs": [], "note": "the runs have no metrics.csv rows"}
    max_steps = key[1] or max(r["steps"][-1] for r in rungs)
    probe_steps = sorted({max(1, round(max_steps * f)) for f in (0.25, 0.5, 1.0)})
    for r in rungs:
        r["loss_at_step"] = {str(s): _at(r["steps"], r["smoothed_loss"], s) for s in probe_steps}
        r["final_smoothed_loss"] = r["smoothed_loss"][-1]
    finals = [r["final_smoothed_loss"] for r in rungs if math.isfinite(r["final_smoothed_loss"])]
    given = target is not None
    if target is None and finals:
        target = max(finals)  # the worst rung's final loss: every rung reaches it
    for r in rungs:
        r["steps_to_target"] = (
            steps_to_target(r["steps"], r["smoothed_loss"], target) if target else None
        )
    prev = None
    for r in rungs:
        r["efficiency"], r["regime"] = None, None
        if prev is not None and prev["steps_to_target"] and r["steps_to_target"]:
            r["efficiency"], r["regime"] = regime(
                prev["batch_size"], prev["steps_to_target"], r["batch_size"], r["steps_to_target"]
            )
        prev = r
    fit = fit_critical_batch(
        [r["batch_size"] for r in rungs], [r["steps_to_target"] for r in rungs]
    )
    all_gns = [r["gradient_noise_scale"] for r in rungs if r["gradient_noise_scale"]]
    noise_scale = statistics.median(all_gns) if all_gns else None
    return {
        "rungs": rungs,
        "compat_key": key[0],
        "max_steps": max_steps,
        "loss_steps": probe_steps,
        "target_loss": target,
        "target_rule": "given" if given else "worst final smoothed loss",
        "fit": fit,
        "empirical_critical_batch": fit["b_crit"] if fit else None,
        "gradient_noise_scale": noise_scale,
        "smoothing": SMOOTHING,
    }


def ladder_section(
    study_dir: str | Path, out_dir: str | Path, target: float | None = None
) -> tuple[str, dict[str, Any], list[str]]:
    """(markdown, json-able data, PNG paths) of the batch-size ladder, for the report."""
    d = ladder_data(study_dir, target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rungs = d["rungs"]
    lines = ["## Batch-size ladder", ""]
    gns = d.get("gradient_noise_scale")
    if not rungs:
        lines.append(f"No ladder: {d.get('note')}.")
        return "\n".join(lines) + "\n", _public(d), []
    if gns:
        lines.append(
            f"Gradient noise scale B_simple (McCandlish et al. 2018), median of the runs: "
            f"**{gns:.3g} sequences**."
        )
        for r in rungs:
            v = critical_batch_verdict(r["batch_size"], gns)
            lines.append(
                f"- batch {r['batch_size']} ({', '.join(r['experiments'])}) is **{v}** the "
                "estimated critical batch"
            )
        lines.append("")
    if len(rungs) < 2:
        lines.append(
            "One batch size only: run `-m experiment=large_batch batch_size=…` over several sizes "
            "for the ladder."
        )
        return "\n".join(lines) + "\n", _public(d), []
    steps_cols = d["loss_steps"]
    lines += [
        f"Same step budget ({d['max_steps']} optimizer steps); smoothed training loss (EMA "
        f"{SMOOTHING}). Target loss for steps-to-target: {d['target_loss']:.4f} "
        f"({d['target_rule']}).",
        "",
        "| batch | lr | "
        + " | ".join(f"loss @ {s}" for s in steps_cols)
        + " | steps to target | efficiency | regime (Shallue et al. 2018) | B_simple |",
        "|" + "---|" * (len(steps_cols) + 6),
    ]
    for r in rungs:
        lines.append(
            f"| {r['batch_size']} | {r['lr']:.4g} | "
            + " | ".join(_fmt(r["loss_at_step"][str(s)]) for s in steps_cols)
            + f" | {r['steps_to_target'] if r['steps_to_target'] is not None else 'not reached'}"
            + f" | {_fmt(r['efficiency'], '.2f')} | {r['regime'] or '–'} | {_fmt(r['gradient_noise_scale'], '.3g')} |"
        )
    bc = d["empirical_critical_batch"]
    lines += [
        "",
        (
            f"Fit S = S_min (1 + B_crit/B) (McCandlish et al. 2018, eq. 2.11): S_min = "
            f"{d['fit']['s_min']:.3g} steps, empirical critical batch **B_crit = {bc:.3g}** sequences"
            if bc
            else "The fit S = S_min (1 + B_crit/B) is not resolved by these rungs"
        )
        + (f"; the gradient noise scale estimates {gns:.3g}." if gns else "."),
        "",
        "The LR of each rung follows the study's rule (not tuned per batch as in Shallue et al.), "
        "and the schedule's decay is tied to the step budget: read steps-to-target with that in "
        "mind.",
    ]
    pngs = _plot(d, out)
    for p in pngs:
        lines.append(f"\n![{Path(p).stem}]({Path(p).name})")
    return "\n".join(lines) + "\n", _public(d), pngs


# ---------------------------------------------------------------- helpers


def _plot(d: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = d["rungs"]
    bs = [r["batch_size"] for r in rungs]
    gns, bc = d.get("gradient_noise_scale"), d.get("empirical_critical_batch")
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in d["loss_steps"]:
        ax.plot(bs, [r["loss_at_step"][str(s)] for r in rungs], "o-", label=f"step {s}")
    _marks(ax, gns, bc)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("smoothed training loss")
    ax.set_title("Loss at a fixed step against batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "ladder_loss_at_step.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(str(p))

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(r["batch_size"], r["steps_to_target"]) for r in rungs if r["steps_to_target"]]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="k", label="measured")
        b0, s0 = pts[0]
        grid = [bs[0] * (bs[-1] / bs[0]) ** (i / 50) for i in range(51)]
        ax.plot(grid, [s0 * b0 / b for b in grid], "--", color="grey", label="perfect scaling")
        if d.get("fit"):
            f = d["fit"]
            ax.plot(
                grid,
                [f["s_min"] * (1 + f["b_crit"] / b) for b in grid],
                "-",
                label="S_min (1 + B_crit/B)",
            )
            ax.axhline(f["s_min"], color="C0", lw=0.8, ls=":", label="S_min")
    _marks(ax, gns, bc)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel(f"steps to loss {d['target_loss']:.3f}")
    ax.set_title("Steps to target loss against batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "ladder_steps_to_target.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(str(p))
    return paths


def _marks(ax: Any, gns: float | None, bc: float | None) -> None:
    if gns:
        ax.axvline(gns, color="C3", ls="--", lw=1, label=f"B_simple {gns:.3g}")
    if bc:
        ax.axvline(bc, color="C2", ls="-.", lw=1, label=f"empirical B_crit {bc:.3g}")


def _at(steps: list[int], values: list[float], step: int) -> float | None:
    for s, v in zip(steps, values):
        if s >= step:
            return v
    return values[-1] if values else None


def _mean_or_none(xs: list[Any]) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def _public(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-able, without the per-step curves (they are in each run's metrics.csv)."""
    out = {k: v for k, v in d.items() if k != "rungs"}
    out["rungs"] = [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in (
            {k: v for k, v in r.items() if k not in ("steps", "smoothed_loss")} for r in d["rungs"]
        )
    ]
    return out
