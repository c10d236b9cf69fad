"""The comparison: large - small along optimizer steps and tokens seen, the final matched point
with its test across seeds, the matched-steps table, the verdict on the hypothesis, and the
overfitting/destabilisation diagnosis. Pure functions of a loaded :class:`Study`; no files."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchsize_study.config import CompareConfig
from batchsize_study.report.load import Group, Run, Study
from batchsize_study.stats import fmt, mean_interval, paired_test, welch_test

HYPOTHESIS = "a larger batch gives a lower loss in a given number of optimizer steps"


def _ranges(xs: np.ndarray) -> list[list[int]]:
    """[[first, last], ...] runs of consecutive steps (or grid points) in ``xs``."""
    out: list[list[int]] = []
    for x in xs.astype(int).tolist():
        if out and x == out[-1][1] + 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return out


def fmt_ranges(ranges: list[list[int]]) -> str:
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges) or "none"


def pairs_by_seed(small: Group, large: Group) -> list[tuple[Run, Run]]:
    """Runs paired by seed (callers fall back to every small run x every large run, untested,
    when the two groups share no seed)."""
    by_seed = {r.seed: r for r in small.runs}
    return [(by_seed[r.seed], r) for r in large.runs if r.seed in by_seed]


def compare_view(small: Group, large: Group, by: str, s: CompareConfig) -> dict[str, Any]:
    """large - small along steps or tokens: where the large batch is lower, by how much, and the
    final matched point (validation loss where both have it there, smoothed train loss otherwise)."""
    pairs = pairs_by_seed(small, large)
    unpaired = not pairs
    if unpaired:
        pairs = [(a, b) for a in small.runs for b in large.runs]
    # The grid: the small run's points within the range every run covers (per token the small
    # batch has the finer grid; the large run is interpolated onto it).
    lo = max(float((r.step if by == "step" else r.tokens)[0]) for p in pairs for r in p)
    hi = min(float((r.step if by == "step" else r.tokens)[-1]) for p in pairs for r in p)
    ref = pairs[0][0]
    grid_all = ref.step if by == "step" else ref.tokens
    grid = grid_all[(grid_all >= lo) & (grid_all <= hi)]
    diffs = np.vstack([b.smoothed_at(grid, by) - a.smoothed_at(grid, by) for a, b in pairs])
    mean, dlo, dhi = mean_interval(diffs, s.confidence)
    small_mean = np.nanmean(np.vstack([a.smoothed_at(grid, by) for a, _ in pairs]), axis=0)
    lower = mean < 0
    unit = "step" if by == "step" else "tokens"
    steps_of_grid = np.interp(grid, grid_all, ref.step) if by != "step" else grid
    out: dict[str, Any] = {
        "axis": unit,
        "paired_seeds": sorted({a.seed for a, _ in pairs}) if not unpaired else [],
        "unpaired": unpaired,
        "range": [lo, hi] if len(grid) else None,
        "points": len(grid),
        "fraction_lower": float(np.mean(lower)) if len(grid) else None,
        # per token the ranges are in the small run's steps (its grid), named as such
        "lower_ranges_small_steps": _ranges(steps_of_grid[lower]),
        "grid": grid.tolist(),
        "difference_mean": mean.tolist(),
        "difference_lo": dlo.tolist(),
        "difference_hi": dhi.tolist(),
    }
    if len(grid):
        rel = mean / small_mean
        i_best = int(np.nanargmin(mean))
        # where large - small is smallest: the large batch's biggest lead when negative
        out["min_difference"] = {
            unit: float(grid[i_best]),
            "difference": float(mean[i_best]),
            "relative": float(rel[i_best]),
        }
        out["final"] = final_point(pairs, float(grid[-1]), by, s, paired=not unpaired)
    return out


def final_point(
    pairs: list[tuple[Run, Run]], x: float, by: str, s: CompareConfig, paired: bool = True
) -> dict[str, Any]:
    """Small and large at one matched step (or token count): the validation loss where every run
    evaluated there, the smoothed training loss otherwise; the per-seed differences and their
    paired test."""
    vals = [(a.val_at(x, by), b.val_at(x, by)) for a, b in pairs]
    use_val = all(va is not None and vb is not None for va, vb in vals)
    if use_val:
        small_v = [float(va) for va, _ in vals]  # type: ignore[arg-type]
        large_v = [float(vb) for _, vb in vals]  # type: ignore[arg-type]
        metric = "val_loss"
    else:
        small_v = [float(a.smoothed_at(np.array([x]), by)[0]) for a, _ in pairs]
        large_v = [float(b.smoothed_at(np.array([x]), by)[0]) for _, b in pairs]
        metric = "smoothed_train_loss"
    d = [lv - sv for sv, lv in zip(small_v, large_v)]
    small_m, large_m = float(np.mean(small_v)), float(np.mean(large_v))
    return {
        "at": x,
        "metric": metric,
        "small": small_m,
        "large": large_m,
        "difference": large_m - small_m,
        "relative": (large_m - small_m) / small_m if small_m else None,
        "per_seed_difference": d,
        "large_lower": large_m < small_m,
        "test": _test(pairs, small_v, large_v, s.confidence, paired),
        "paired": paired,
        "val_se": _val_se(pairs, x, by, large_m - small_m) if use_val else None,
    }


VAL_SE_SIGMAS = 2.0
"""A final difference 'exceeds the validation set's noise' when it is larger than this many
standard errors of the difference of the two validation estimates."""


def _val_se(pairs: list[tuple[Run, Run]], x: float, by: str, diff: float) -> dict | None:
    """The validation set's own noise at the final validation point: each run's record may
    carry ``final_val_loss_se`` (SE of its mean loss over the validation windows). The SE of a
    group's mean over seeds is sqrt(sum se_i^2) / n; of the difference, the two combined in
    quadrature (conservative: both runs score the same windows, which a paired per-window
    comparison would exploit). None when a run has no such SE or x is not its last validation."""
    groups: list[dict[int, float]] = [{}, {}]
    for pair in pairs:
        for side, run in enumerate(pair):
            se = run.record.get("final_val_loss_se")
            last = (run.val_step if by == "step" else run.val_tokens)[-1:]
            if se is None or not len(last) or float(last[0]) != x:
                return None
            groups[side][id(run)] = float(se)
    small, large = (math.sqrt(sum(v**2 for v in g.values())) / len(g) for g in groups)
    se_diff = math.sqrt(small**2 + large**2)
    return {
        "small": small,
        "large": large,
        "difference": se_diff,
        "sigmas": abs(diff) / se_diff if se_diff > 0 else None,
        "exceeds": bool(abs(diff) > VAL_SE_SIGMAS * se_diff),
        "rule": f"|difference| > {VAL_SE_SIGMAS:g} x the SE of the difference",
    }


def _test(
    pairs: list[tuple[Run, Run]],
    small_v: list[float],
    large_v: list[float],
    level: float,
    paired: bool,
) -> dict[str, Any] | None:
    """Paired t-test on per-seed differences when the groups share seeds; otherwise (``pairs``
    is every small run x every large run) Welch's test on one value per run."""
    if paired:
        test = paired_test([lv - sv for sv, lv in zip(small_v, large_v)], level)
        return None if test is None else {**test, "kind": "paired"}
    small = {id(a): v for (a, _), v in zip(pairs, small_v)}
    large = {id(b): v for (_, b), v in zip(pairs, large_v)}
    test = welch_test(list(small.values()), list(large.values()), level)
    return None if test is None else {**test, "kind": "welch"}


def matched_points(small: Group, large: Group, s: CompareConfig) -> list[dict[str, Any]]:
    """Rows of the matched-steps table: evenly spaced steps plus every validation step both
    have; the validation loss where both evaluated, the smoothed train loss otherwise."""
    pairs = pairs_by_seed(small, large) or [(a, b) for a in small.runs for b in large.runs]
    last = int(min(min(a.step[-1], b.step[-1]) for a, b in pairs))
    even = {int(round(v)) for v in np.linspace(1, last, max(2, s.table_points))}
    vals = set(small.val_curve("step", s.confidence)["x"].astype(int).tolist()) & set(
        large.val_curve("step", s.confidence)["x"].astype(int).tolist()
    )
    rows = []
    for step in sorted(even | {v for v in vals if v <= last}):
        p = final_point(pairs, float(step), "step", s)
        rows.append(
            {
                "step": step,
                "metric": p["metric"],
                "small": p["small"],
                "large": p["large"],
                "difference": p["difference"],
                "relative": p["relative"],
            }
        )
    return rows


def diagnose(run: Run, tolerance: float) -> dict[str, Any]:
    """Tell overfitting from destabilisation (the seed's distinction): overfitting is a
    validation loss that rises above its minimum while the training loss keeps falling; a
    destabilisation is a training loss that rises too."""
    out: dict[str, Any] = {"run_id": run.run_id, "flag": None}
    if len(run.val_loss) < 2 or not np.isfinite(run.val_loss).any():
        out["note"] = "fewer than two validation points: nothing to tell"
        return out
    i_min = int(np.nanargmin(run.val_loss))
    best, last = float(run.val_loss[i_min]), float(run.val_loss[-1])
    step_min, step_last = float(run.val_step[i_min]), float(run.val_step[-1])
    tr_min = float(run.smoothed_at(np.array([step_min]), "step")[0])
    tr_last = float(run.smoothed_at(np.array([step_last]), "step")[0])
    rise = (last - best) / best if best else 0.0
    out.update(
        val_min_step=step_min,
        val_min=best,
        val_last=last,
        val_rise=rise,
        train_at_val_min=tr_min,
        train_last=tr_last,
    )
    if not math.isfinite(last) or (rise > tolerance and tr_last >= tr_min):
        out["flag"] = "destabilised"
        out["note"] = (
            f"validation loss rose {rise:+.1%} after step {step_min:.0f} and the training loss "
            f"did not fall ({tr_min:.4f} -> {tr_last:.4f}): a destabilisation, not overfitting"
        )
    elif rise > tolerance:
        out["flag"] = "overfitting"
        out["note"] = (
            f"validation loss rose {rise:+.1%} after step {step_min:.0f} while the training loss "
            f"fell ({tr_min:.4f} -> {tr_last:.4f}): overfitting"
        )
    return out


def supports(final: dict[str, Any]) -> str:
    """The verdict from the final matched point: supported / not supported when the test
    across seeds is significant (or there is one paired seed, said to rest on it); inconclusive
    when it is not; untested when no test is defined (unpaired groups too small for Welch's
    test, or no spread at all): never a verdict from the sign of unpaired means alone."""
    test = final.get("test")
    sign = "supported" if final["large_lower"] else "not supported"
    if test is None:
        return sign if final.get("paired", True) else "untested"
    if test.get("undefined"):
        return "untested"
    return sign if test["significant"] else "inconclusive"


def _val_se_sentence(final: dict[str, Any]) -> str:
    v = final["val_se"]
    verb = "exceeds" if v["exceeds"] else "does not exceed"
    return (
        f"The validation loss is itself an estimate (standard error {v['small']:.4f} small, "
        f"{v['large']:.4f} large; {v['difference']:.4f} for the difference): the final "
        f"difference is {fmt(v['sigmas'], '.1f')} standard errors, so it {verb} the validation "
        f"set's noise ({VAL_SE_SIGMAS:g} standard errors)."
    )


def _seed_sentence(final: dict[str, Any], level: float) -> str:
    test = final.get("test")
    paired = final.get("paired", True)
    if test is None and not paired:
        return (
            "The two groups share no seed and one of them has a single seed, so there is neither "
            "a paired nor an unpaired test: the difference is untested; run both with the same "
            "seeds (e.g. `-m seed=0,1,2`) to compare them against the seed-to-seed spread."
        )
    if test is None:
        return (
            "This rests on one seed: there is no estimate of the seed-to-seed spread, so the "
            "difference may be noise; run more seeds (e.g. `-m seed=0,1,2 experiment=...`) to test it."
        )
    if test.get("undefined"):
        what = (
            f"across {test['n_seeds']} paired seeds the per-seed differences are identical "
            f"({test['mean_difference']:+.4f} each), so the paired t-test is undefined"
            if paired
            else "the two groups share no seed and neither varies, so Welch's test is undefined"
        )
        return (
            f"Untested: {what} (no spread to test against, not a p-value of zero); no verdict is "
            "drawn from it."
        )
    lo, hi = test["interval"]
    verb = "is" if test["significant"] else "is not"
    if test["kind"] == "welch":
        return (
            f"The two groups share no seed, so they are compared unpaired: across "
            f"{test['n_small']} small and {test['n_large']} large seeds the final difference "
            f"{verb} larger than the seed-to-seed spread (Welch's t-test: mean "
            f"{test['mean_difference']:+.4f}, {level:.0%} interval [{lo:+.4f}, {hi:+.4f}], "
            f"t = {fmt(test['t'], '.2f')}, df = {fmt(test['df'], '.1f')}, "
            f"p = {test['p_value']:.3g})."
        )
    return (
        f"Across {test['n_seeds']} paired seeds the final difference {verb} larger than the "
        f"seed-to-seed spread (paired t-test: mean {test['mean_difference']:+.4f}, "
        f"{level:.0%} interval [{lo:+.4f}, {hi:+.4f}], t = {fmt(test['t'], '.2f')}, "
        f"p = {test['p_value']:.3g})."
    )


def verdict_for(study: Study, large: Group, s: CompareConfig) -> dict[str, Any]:
    """The verdict on the hypothesis for one large batch size against the small baseline."""
    small = study.small
    per_step = compare_view(small, large, "step", s)
    per_token = compare_view(small, large, "tokens", s)
    fs, ft = per_step.get("final", {}), per_token.get("final", {})
    verdict_step = supports(fs) if fs else "no data"
    verdict_token = supports(ft) if ft else "no data"
    name = "validation loss" if fs.get("metric") == "val_loss" else "smoothed training loss"
    lines = [
        f"**Large batch {large.batch_size} vs small batch {small.batch_size}** "
        f"(seeds {large.seeds} vs {small.seeds}).",
    ]
    if fs:
        adv = per_step["min_difference"]
        lead = (
            f"its largest lead is {-adv['difference']:.4f} nats ({-adv['relative']:.1%}) at step "
            f"{adv['step']:.0f}"
            if adv["difference"] < 0
            else "it is never lower"
        )
        lines.append(
            f"Per optimizer step: the large batch has the lower smoothed training loss at "
            f"{per_step['fraction_lower']:.0%} of the {per_step['points']} matched steps "
            f"(steps {fmt_ranges(per_step['lower_ranges_small_steps'])}); {lead}. "
            f"At the final matched step {fs['at']:.0f} its {name} is {fs['large']:.4f} vs "
            f"{fs['small']:.4f}: {'lower' if fs['large_lower'] else 'higher'} by "
            f"{abs(fs['difference']):.4f} ({abs(fs['relative'] or 0):.1%})."
        )
        if fs.get("val_se"):
            lines.append(_val_se_sentence(fs))
        lines.append(_seed_sentence(fs, s.confidence))
    if ft:
        ratio = large.runs[0].tokens_per_step / small.runs[0].tokens_per_step
        tname = "validation loss" if ft.get("metric") == "val_loss" else "smoothed training loss"
        lines.append(
            f"Per token seen (compute-fair; the large batch sees {ratio:g}× the tokens per step): "
            f"at equal tokens the large batch is lower at {per_token['fraction_lower']:.0%} of "
            f"the matched points; at {ft['at']:,.0f} tokens (the end of the shorter run) its "
            f"{tname} is {ft['large']:.4f} vs {ft['small']:.4f}: "
            f"{'lower' if ft['large_lower'] else 'higher'} by {abs(ft['difference']):.4f}, so "
            f"{'it holds per token too' if ft['large_lower'] else 'per token the small batch is ahead'}."
        )
        if ft.get("test"):
            lines.append(_seed_sentence(ft, s.confidence))
    lines.append(
        f"Verdict: per step the hypothesis is **{verdict_step}**; per token it is "
        f"**{verdict_token}**."
    )
    n_pairs = len(pairs_by_seed(small, large))
    return {
        "large_batch_size": large.batch_size,
        "small_batch_size": small.batch_size,
        "large_seeds": large.seeds,
        "small_seeds": small.seeds,
        "per_step_verdict": verdict_step,
        "per_token_verdict": verdict_token,
        # A verdict's weight, in the object and not only in the prose: one paired seed is the
        # sign of one difference; two or more are a test across seeds.
        "paired_seeds": n_pairs,
        "one_seed": n_pairs <= 1,
        "evidence": (
            "one seed: the sign of one paired difference, no test across seeds"
            if n_pairs <= 1
            else f"a paired t-test across {n_pairs} seeds"
        ),
        "per_step": {k: v for k, v in per_step.items() if not _is_curve(k)},
        "per_token": {k: v for k, v in per_token.items() if not _is_curve(k)},
        "curves": {
            "per_step": {k: per_step[k] for k in per_step if _is_curve(k)},
            "per_token": {k: per_token[k] for k in per_token if _is_curve(k)},
        },
        "matched_steps": matched_points(small, large, s),
        "text": " ".join(lines),
    }


def _is_curve(key: str) -> bool:
    return key in ("grid", "difference_mean", "difference_lo", "difference_hi")


def overall(verdicts: list[str]) -> str:
    """One verdict when every large batch agrees, else 'mixed'."""
    return verdicts[0] if len(set(verdicts)) == 1 else "mixed"
