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

Pure functions of records (dicts) and numbers: the report (batchsize_study.report) reads the
files and draws the figures.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from scipy.stats import linregress

from batchsize_study.stats import median, t_quantile

SMOOTHING = 0.9  # EMA factor of the training loss, as the detector's default (~10 steps)
PERFECT, MAXIMAL = 0.8, 0.2  # log-speedup efficiency thresholds between Shallue's regimes
MIN_FIT_RUNGS = 3
"""Distinct batch sizes the B_crit fit needs: two determine S_min and B_crit exactly, so the
fit would be reported with no check that the model describes the rungs at all."""


def steps_to_target(steps: list[int], smoothed: list[float], target: float) -> int | None:
    """The first optimizer step whose smoothed loss is at or below ``target``; None if never."""
    for s, v in zip(steps, smoothed):
        if math.isfinite(v) and v <= target:
            return s
    return None


def fit_critical_batch(
    batch_sizes: list[float], steps: list[float | None], level: float = 0.95
) -> dict[str, float | None] | None:
    """Least squares of S = S_min + (S_min B_crit) / B (McCandlish et al. 2018, eq. 2.11), with
    an interval on B_crit so a fit over a few noisy rungs is not read as exact.

    Linear in 1/B: S = a + b/B with a = S_min, b = S_min B_crit, so B_crit = b / a; the line is
    scipy.stats.linregress's. Needs :data:`MIN_FIT_RUNGS` distinct batch sizes (two would fit
    exactly, whatever the curve); None with fewer, or when the fit is non-physical (a <= 0 or
    b < 0).

    The interval (``b_crit_lo``, ``b_crit_hi`` at ``level``) is the delta method on
    log B_crit = log b - log a with the fit's covariance: var(b) and var(a) are linregress's
    squared standard errors, cov(a, b) = -mean(1/B) var(b) for ordinary least squares, and
    var(log B_crit) = var(b)/b^2 + var(a)/a^2 - 2 cov(a, b)/(a b); a t interval with n - 2
    degrees of freedom, exponentiated (positive ends; the log scale as for the noise scale,
    which varies by factors). ``b_crit_se`` is the same on B_crit's scale, B_crit se(log B_crit).
    With B_crit = 0 there is no log: the interval is None. Least squares assumes equal noise on
    every rung's steps: simulated ladders give 95 % coverage then, ~92 % when the noise is
    proportional to S (tests/test_stats.py).
    """
    pts = [(1.0 / b, s) for b, s in zip(batch_sizes, steps) if s is not None]
    if len({p[0] for p in pts}) < MIN_FIT_RUNGS:
        return None
    x = [p[0] for p in pts]
    line = linregress(x, [p[1] for p in pts])
    a, b = float(line.intercept), float(line.slope)
    if a <= 0 or b < 0:
        return None
    df = len(pts) - 2
    out: dict[str, float | None] = {
        "s_min": a,
        "b_crit": b / a,
        "b_crit_se": None,
        "b_crit_lo": None,
        "b_crit_hi": None,
        "level": level,
        "df": df,
    }
    if b > 0:
        var_b, var_a = line.stderr**2, line.intercept_stderr**2
        cov_ab = -statistics.fmean(x) * var_b
        se_log = math.sqrt(max(0.0, var_b / b**2 + var_a / a**2 - 2 * cov_ab / (a * b)))
        half = t_quantile(level, df) * se_log
        out.update(
            b_crit_se=b / a * se_log,
            b_crit_lo=b / a * math.exp(-half),
            b_crit_hi=b / a * math.exp(half),
        )
    return out


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


def noise_scale_estimate(records: list[dict[str, Any]], level: float) -> dict[str, Any] | None:
    """The gradient noise scale B_simple of the ladder's runs with an interval, or None.

    Several seeds: one value per seed (the median of its runs), and the t interval of the mean
    of log B_simple across seeds (Student; on the log scale because the estimate varies by
    factors between seeds, tenfold on the default study), reported as the geometric mean and
    exp of the interval's ends. One seed: the runs' own ``noise.b_simple_interval`` (how it was
    estimated: ``noise.interval_method``), the widest span over that seed's runs; without one
    there is no interval.
    """
    by_seed: dict[int, list[float]] = {}
    intervals: list[list[float]] = []
    run_means: list[float] = []
    methods: set[str] = set()
    for r in records:
        v = r.get("gradient_noise_scale")
        if v is None or not math.isfinite(v) or v <= 0:
            continue
        by_seed.setdefault(int(r.get("seed", 0)), []).append(float(v))
        noise = r.get("noise") or {}
        if noise.get("b_simple_interval"):
            intervals.append([float(x) for x in noise["b_simple_interval"]])
            methods.add(str(noise.get("interval_method") or "not stated"))
            mean = (noise.get("run_mean") or {}).get("b_simple")
            if noise.get("interval_of") == "run_mean" and mean is not None and mean > 0:
                run_means.append(float(mean))
    if not by_seed:
        return None
    per_seed = {seed: median(vals) for seed, vals in sorted(by_seed.items())}
    out: dict[str, Any] = {"n_seeds": len(per_seed), "per_seed": per_seed, "level": level}
    if len(per_seed) >= 2:
        logs = [math.log(v) for v in per_seed.values()]
        centre = statistics.fmean(logs)
        half = t_quantile(level, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
        out.update(
            value=math.exp(centre),
            interval=[math.exp(centre - half), math.exp(centre + half)],
            method=(
                f"{level:.0%} t interval of the mean of log B_simple over {len(logs)} seeds "
                "(one value per seed), shown as the geometric mean"
            ),
        )
        return out
    (values,) = by_seed.values()
    out["value"] = median(values)
    if intervals and len(intervals) == len(values):
        out["interval"] = [min(i[0] for i in intervals), max(i[1] for i in intervals)]
        out["method"] = f"the run's own interval ({'; '.join(sorted(methods))}), one seed"
        if len(run_means) == len(intervals):  # the interval is the whole-run estimate's
            out["value"] = median(run_means)
            out["method"] += (
                "; the value is the runs' whole-run estimate the interval belongs to (the final "
                "EMA estimates, per_seed, are later in training, where B_simple has grown)"
            )
    else:
        out["interval"] = None
        out["method"] = "one seed and no recorded interval: the uncertainty is unknown"
    return out


def noise_regime(batch_size: float, estimate: dict[str, Any] | None) -> str:
    """'below' / 'near' / 'above' the noise scale when every value in its interval gives the
    same answer (:func:`critical_batch_verdict`, monotone in the critical batch, so the two
    ends decide); 'uncertain' otherwise, or without an interval."""
    if not estimate or not estimate.get("interval"):
        return "uncertain"
    lo, hi = estimate["interval"]
    ends = {critical_batch_verdict(batch_size, lo), critical_batch_verdict(batch_size, hi)}
    return ends.pop() if len(ends) == 1 and "unknown" not in ends else "uncertain"


def value_at(steps: list[int], values: list[float], step: int) -> float | None:
    """The value at the first step at or after ``step`` (the last value if the run is shorter)."""
    for s, v in zip(steps, values):
        if s >= step:
            return v
    return values[-1] if values else None


def rung(records: list[dict[str, Any]], steps: list[int], smoothed_mean: list[float]) -> dict:
    """One rung from its records (one per seed) and its seed-mean smoothed loss curve."""
    gns = [r["gradient_noise_scale"] for r in records if r.get("gradient_noise_scale")]
    return {
        "batch_size": int(records[0]["batch_size"]),
        "runs": [r["run_id"] for r in records],
        "experiments": sorted({r["experiment"] for r in records}),
        "lr": statistics.fmean(float(r["lr"]) for r in records),
        "steps": steps,
        "smoothed_loss": smoothed_mean,
        "final_val_loss": _mean_or_none([r.get("final_val_loss") for r in records]),
        "gradient_noise_scale": statistics.median(gns) if gns else None,
    }


def analyse_ladder(
    rungs: list[dict[str, Any]],
    key: tuple[Any, Any],
    target: float | None = None,
    noise: dict[str, Any] | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Loss at fixed steps, steps to the target loss, Shallue's regime per rung step, the fit of
    S = S_min (1 + B_crit / B), and where each rung sits against the noise scale ``noise``
    (:func:`noise_scale_estimate`), from the rungs (ordered by batch size)."""
    if not rungs:
        return {"rungs": [], "note": "the runs have no metrics.csv rows"}
    max_steps = key[1] or max(r["steps"][-1] for r in rungs)
    probe_steps = sorted({max(1, round(max_steps * f)) for f in (0.25, 0.5, 1.0)})
    for r in rungs:
        r["loss_at_step"] = {
            str(s): value_at(r["steps"], r["smoothed_loss"], s) for s in probe_steps
        }
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
        [r["batch_size"] for r in rungs], [r["steps_to_target"] for r in rungs], level
    )
    reached = len({r["batch_size"] for r in rungs if r["steps_to_target"] is not None})
    if fit is not None:
        fit_note = f"least squares over {reached} batch sizes"
    elif reached < MIN_FIT_RUNGS:
        fit_note = (
            f"it needs at least {MIN_FIT_RUNGS} batch sizes that reach the target "
            f"({reached} did); two determine S_min and B_crit exactly, with nothing left to "
            "check the model against"
        )
    else:
        fit_note = "the least-squares fit is non-physical (S_min <= 0 or B_crit < 0)"
    all_gns = [r["gradient_noise_scale"] for r in rungs if r["gradient_noise_scale"]]
    noise_scale = statistics.median(all_gns) if all_gns else None
    for r in rungs:
        r["noise_regime"] = noise_regime(r["batch_size"], noise)
    return {
        "rungs": rungs,
        "compat_key": key[0],
        "max_steps": max_steps,
        "loss_steps": probe_steps,
        "target_loss": target,
        "target_rule": "given" if given else "worst final smoothed loss",
        "fit": fit,
        "fit_note": fit_note,
        "empirical_critical_batch": fit["b_crit"] if fit else None,
        "gradient_noise_scale": noise_scale,
        "noise_scale": noise,
        "smoothing": SMOOTHING,
    }


def public(d: dict[str, Any]) -> dict[str, Any]:
    """The ladder for comparison.json: without the per-step curves (they are in each run's
    metrics.csv)."""
    out = {k: v for k, v in d.items() if k != "rungs"}
    out["rungs"] = [
        {k: v for k, v in r.items() if k not in ("steps", "smoothed_loss")} for r in d["rungs"]
    ]
    return out


def _mean_or_none(xs: list[Any]) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None
