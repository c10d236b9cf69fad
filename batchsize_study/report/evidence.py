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
    y_gap: tuple[float, float]
    """y's final loss minus the best swept LR's (nats): lowest and highest over the seeds."""


# docs/lr_sweep.md, "x and y by axis": every row from full-length runs (seed 0 unless said).
CHECKED: tuple[Checked, ...] = (
    Checked("default (model=tiny)", 1.377e6, 9.044e6, 300, "stdlib", (0.002, 0.002)),
    Checked("seeds 0-4 of x (interpolated)", 1.377e6, 9.044e6, 300, "stdlib", (0.002, 0.060)),
    Checked("4x the steps (interpolated)", 1.377e6, 9.044e6, 1200, "stdlib", (0.011, 0.011)),
    Checked("held-out corpus", 1.377e6, 9.044e6, 300, "perl", (0.028, 0.028)),
)

OUTSIDE = 1.5
"""A study more than this factor beyond the checked range (FLOPs per token, steps) is outside it."""


def _flops(v: float) -> str:
    return f"{v / 1e9:.3g} G" if v >= 1e9 else f"{v / 1e6:.3g} M"


def _span(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


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
        f"and {len({c.corpus for c in CHECKED})} corpora (docs/lr_sweep.md): there y trained within {gaps[0]:+.3f} .. "
        f"{gaps[1]:+.3f} nats of the best swept LR."
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
            "`'sweep.multiples=[0.25,0.5,1]'`) before trusting the verdict's learning rates."
        )
    else:
        out["note"] = f"{where} This study lies inside that range; its own y is not swept."
    return out
