"""The stability probe's decision (``experiment=stability_probe``, batchsize_study.probe): where
training at a constant LR of m * x stops improving. Pure functions of loss lists and the probes'
summaries; the definitions are in batchsize_study.probe's docstring.
"""

from __future__ import annotations

import math
from typing import Any

from batchsize_study.stats import ema

SUMMARY = "stability_probe_summary"
SMOOTHING = 0.9  # EMA factor for "still improving", as the detector's default (~10 steps)


def final_loss(losses: list[float], window: int) -> float:
    """Mean of the last ``window`` losses; +inf if any loss was non-finite (the run blew up)."""
    if not losses or any(not math.isfinite(v) for v in losses):
        return math.inf
    tail = losses[-window:]
    return sum(tail) / len(tail)


def final_loss_se(losses: list[float], window: int) -> float:
    """Standard error of :func:`final_loss` (std of the window's losses / sqrt(window))."""
    tail = losses[-window:]
    if len(tail) < 2 or any(not math.isfinite(v) for v in tail):
        return math.inf
    mean = sum(tail) / len(tail)
    var = sum((v - mean) ** 2 for v in tail) / (len(tail) - 1)
    return math.sqrt(var / len(tail))


def still_improving(losses: list[float], window: int) -> bool:
    """True when the smoothed loss sets a new best within the last ``window`` steps."""
    if len(losses) <= window or any(not math.isfinite(v) for v in losses):
        return False
    sm = ema(losses, SMOOTHING)
    return bool(min(sm[-window:]) < min(sm[:-window]))


def analyse(
    unstable_lr: float, probes: list[dict[str, Any]], noise_sigmas: float = 2.0
) -> dict[str, Any]:
    """Where training stops improving (definitions: batchsize_study.probe's docstring).

    ``probes``: dicts with ``multiple``, ``final_loss``, ``final_loss_se`` (0 if absent),
    ``destabilised`` and, reported only, ``improving``. Returns the per-probe
    verdicts, ``last_good``/``first_bad`` multiples, ``boundary_lr`` (None when every multiple
    improved: the boundary is above the probed range), ``x_over_boundary``,
    ``agrees_within_2x`` and, beside them, ``short_horizon_best_multiple``.
    """
    ordered = sorted(probes, key=lambda p: p["multiple"])
    verdicts, prev, best_lower = [], None, None
    first_bad = last_good = first_bad_local = None
    for p in ordered:
        finite = math.isfinite(p["final_loss"])
        se = p.get("final_loss_se") or 0.0
        margin = math.inf
        if best_lower is not None and finite:
            tol = noise_sigmas * math.sqrt(se**2 + (best_lower.get("final_loss_se") or 0.0) ** 2)
            margin = p["final_loss"] - best_lower["final_loss"] - tol
        worse_sig = best_lower is not None and finite and margin > 0
        stops = bool(not finite or p.get("destabilised") or worse_sig)
        reason = (
            "non-finite loss"
            if not finite
            else "destabilised during the run"
            if p.get("destabilised")
            else f"final loss worse than at {best_lower['multiple']:g}x beyond the noise"
            if worse_sig and best_lower is not None
            else ""
        )
        if finite and (best_lower is None or p["final_loss"] < best_lower["final_loss"]):
            best_lower = p
        worse = prev is not None and p["final_loss"] >= prev["final_loss"]
        verdicts.append(
            {**p, "stops_improving": stops, "reason": reason, "worse_than_lower": worse}
        )
        if stops and first_bad_local is None:
            first_bad_local = p["multiple"]
        prev = p
    for i, v in enumerate(verdicts):  # the smallest m from which every higher m stops improving
        if all(w["stops_improving"] for w in verdicts[i:]):
            first_bad = v["multiple"]
            last_good = verdicts[i - 1]["multiple"] if i > 0 else None
            break
    for v in verdicts:
        v["beyond_boundary"] = first_bad is not None and v["multiple"] >= first_bad
    finite = [p for p in ordered if math.isfinite(p["final_loss"])]
    best = min(finite, key=lambda p: p["final_loss"])["multiple"] if finite else None
    out: dict[str, Any] = {
        "probes": verdicts,
        "last_good_multiple": last_good,
        "first_bad_multiple": first_bad,
        "first_bad_local": first_bad_local,
        "unstable_lr": unstable_lr,
        "short_horizon_best_multiple": best,
        "short_horizon_best_lr": best * unstable_lr if best is not None else None,
    }
    if first_bad is None:
        out.update(
            boundary_lr=None,
            boundary="above the probed range",
            x_over_boundary=None,
            # above M x with M >= 2 is more than 2x above x; below that it is undetermined
            agrees_within_2x=False if ordered[-1]["multiple"] >= 2.0 else None,
        )
        return out
    if last_good is None:
        boundary_multiple = first_bad / 2.0  # below the probed range: at most half the lowest
        where = "below the probed range"
    else:
        boundary_multiple = math.sqrt(last_good * first_bad)
        where = f"between {last_good:g}x and {first_bad:g}x"
    boundary_lr = boundary_multiple * unstable_lr
    out.update(
        boundary_lr=boundary_lr,
        boundary_multiple=boundary_multiple,
        boundary=where,
        x_over_boundary=unstable_lr / boundary_lr,
        agrees_within_2x=0.5 <= unstable_lr / boundary_lr <= 2.0,
    )
    return out


def optimum_at_lowest_multiple(summary: dict[str, Any]) -> bool:
    """Whether a probe summary's short-horizon optimum is its lowest multiple: the optimum may
    then lie below the grid, so ``y_from=probe`` refuses it and the report says so."""
    best = summary.get("short_horizon_best_multiple")
    multiples = [float(p["multiple"]) for p in summary.get("probes") or []]
    return best is not None and bool(multiples) and float(best) <= min(multiples)
