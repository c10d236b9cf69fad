"""Where the seed rule was checked, so a report can say how far y may sit from the best LR.

The rule (x from the superconvergence warmup, y = x/2 for the small batch) was checked against LR
sweeps of full-length runs (``experiment=lr_sweep``) on a few settings: model size, run length,
seed and corpus (docs/lr_sweep.md, raw records under benchmarks/results/lr_sweep/). A study whose
model or run length lies outside them is told so, with the measured gaps as the only evidence the
package has, and what to run to measure its own. A study with its own small-batch sweep needs none
of this: its sensitivity section measures y against its best LR directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Checked:
    """One setting at which y was compared with the best swept LR (docs/lr_sweep.md)."""

    what: str
    params: float
    flops_per_token: float
    """Training FLOPs per token as the records measure them (flops.flops_per_token)."""
    max_steps: int
    corpus: str
    x_from: str
    """Which superconvergence runs x came from."""
    y_gap: tuple[float, float]
    """y's final loss minus the best swept LR's (nats): lowest and highest over the x's."""
    best_over_x: float | None
    """The best swept LR over x: the factor the rule's 0.5 stands for at this setting."""


# docs/lr_sweep.md, "x and y by axis": every row from full-length runs.
CHECKED: tuple[Checked, ...] = (
    Checked("default", 1.377e6, 9.044e6, 300, "stdlib", "seed 0", (0.002, 0.002), 0.44),
    Checked("seeds", 1.377e6, 9.044e6, 300, "stdlib", "each of 5 seeds", (0.002, 0.060), None),
    Checked("seeds", 1.377e6, 9.044e6, 300, "stdlib", "median of any 3", (0.002, 0.043), None),
    Checked("run length", 1.377e6, 9.044e6, 1200, "stdlib", "seed 0", (0.011, 0.011), 0.44),
    Checked("corpus", 1.377e6, 9.044e6, 300, "perl", "seed 0", (0.028, 0.028), 0.43),
    Checked("model size", 5.869e6, 37.55e6, 300, "stdlib", "median of 3", (0.031, 0.031), 0.22),
    Checked("model size", 5.869e6, 37.55e6, 300, "stdlib", "each of 3 seeds", (0.005, 0.227), None),
)

OUTSIDE = 1.5
"""A study more than this factor beyond the checked range (FLOPs per token, steps) is outside it."""


def _flops(v: float) -> str:
    return f"{v / 1e9:.3g} G" if v >= 1e9 else f"{v / 1e6:.3g} M"


def _span(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def checked_table() -> str:
    """The checked settings as a markdown table (the report prints it under the note)."""
    rows = [
        "| axis | params | FLOPs per token | steps | corpus | x from | y's loss minus the best | "
        "best LR / x |",
        "|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for c in CHECKED:
        lo, hi = c.y_gap
        gap = f"{lo:+.3f}" if lo == hi else f"{lo:+.3f} .. {hi:+.3f}"
        factor = f"{c.best_over_x:.2f}" if c.best_over_x is not None else ""
        rows.append(
            f"| {c.what} | {c.params / 1e6:.1f}M | {_flops(c.flops_per_token)} | "
            f"{c.max_steps:,} | {c.corpus} | {c.x_from} | {gap} | {factor} |"
        )
    return "\n".join(rows)


def _drift() -> str:
    """How the best LR's factor moved with model size, from the rows that measured it."""
    sized = [c for c in CHECKED if c.best_over_x]  # the first of each size: the default corpus
    small = min(sized, key=lambda c: c.flops_per_token)
    large = max(sized, key=lambda c: c.flops_per_token)
    (f0, k0), (f1, k1) = (
        (small.flops_per_token, small.best_over_x),
        (large.flops_per_token, large.best_over_x),
    )
    if f1 <= f0 * OUTSIDE:
        return ""
    return (
        f" The best LR fell from {k0:.2f}·x to {k1:.2f}·x as the FLOPs per token grew "
        f"{f1 / f0:.1f}x, so a larger model's y may sit further above its best."
    )


def rule_evidence(
    flops_per_token: float | None, max_steps: int | None, own_sweep: bool
) -> dict[str, Any]:
    """What the package knows of y's distance from the best LR for a study of this model and run
    length: the checked range, whether the study lies inside it, and a sentence for the report."""
    flops = _span([c.flops_per_token for c in CHECKED])
    steps = _span([float(c.max_steps) for c in CHECKED])
    gaps = _span([g for c in CHECKED for g in c.y_gap])
    out: dict[str, Any] = {
        "checked": [asdict(c) for c in CHECKED],
        "flops_per_token_range": list(flops),
        "max_steps_range": list(steps),
        "y_gap_range": list(gaps),
        "flops_per_token": flops_per_token,
        "max_steps": max_steps,
        "own_sweep": own_sweep,
    }
    where = (
        f"y = x/2 was checked against full-length LR sweeps at {_flops(flops[0])}FLOPs-"
        f"{_flops(flops[1])}FLOPs per token, {steps[0]:,.0f}-{steps[1]:,.0f} steps "
        f"and {len({c.corpus for c in CHECKED})} corpora (docs/lr_sweep.md): there y trained "
        f"within {gaps[0]:+.3f} .. {gaps[1]:+.3f} nats of the best swept LR (table below; "
        "the widest gaps come from one seed's x, `x_from=median` of three narrows them)." + _drift()
    )
    beyond = []
    if flops_per_token and not flops[0] / OUTSIDE <= flops_per_token <= flops[1] * OUTSIDE:
        beyond.append(
            f"this study's model ({_flops(flops_per_token)}FLOPs per token) is "
            f"{max(flops_per_token / flops[1], flops[0] / flops_per_token):.1f}x outside that "
            "range of model sizes"
        )
    if max_steps and not steps[0] / OUTSIDE <= max_steps <= steps[1] * OUTSIDE:
        beyond.append(f"its runs ({max_steps:,} steps) are outside that range of run lengths")
    out["outside"] = bool(beyond)
    if own_sweep:
        out["note"] = (
            f"{where} This study has its own small-batch LR sweep: the sensitivity section "
            "measures y against its best LR here."
        )
    elif beyond:
        out["note"] = (
            f"{where} But {' and '.join(beyond)}, so how far y sits from the best LR here is not "
            "measured. Run `-m experiment=lr_sweep batch_size=16,64` (or a few LRs around y: "
            "`'sweep.multiples=[0.125,0.25,0.5,1]'`) before trusting the verdict's learning rates, "
            "or, for a fraction of that, `experiment=stability_probe` and then "
            "`y_from=probe` (its optimum tracked the best LR at both checked sizes)."
        )
    else:
        out["note"] = f"{where} This study lies inside that range; its own y is not swept."
    return out
