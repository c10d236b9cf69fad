"""The report's figures, in one style. Each function returns a matplotlib Figure built without
pyplot (no GUI backend, no global state; Agg renders the PNG). The report saves them with
:func:`save` at ``compare.dpi``; the notebook displays the same objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FixedLocator, NullFormatter, NullLocator

from batchsize_study.report.load import Group, Study
from batchsize_study.study.stages import SMALL_BATCH

SMALL_COLOR = "#1f77b4"
LARGE_COLORS = ("#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
SC_COLOR = "#555555"
LOSS_LABEL = "loss (nats per token)"
X_LABEL = {"step": "optimizer step", "tokens": "tokens seen"}


def new_figure(w: float = 8.0, h: float = 5.0, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)  # Agg renders the PNG; no pyplot, no display needed
    axes = fig.subplots(1, ncols)
    return fig, axes


def save(fig: Figure, path: str | Path, dpi: int) -> None:
    """Write a figure as PNG: the one resolution (``compare.dpi``) and margin rule."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


def group_color(study: Study, group: Group) -> str:
    if group.experiment == SMALL_BATCH:
        return SMALL_COLOR
    i = [g.batch_size for g in study.large].index(group.batch_size)
    return LARGE_COLORS[i % len(LARGE_COLORS)]


def _seed_note(g: Group) -> str:
    return f"seed {g.seeds[0]}" if len(g.seeds) == 1 else f"{len(g.seeds)} seeds, mean"


def _style(ax: Axes, by: str, title: str) -> None:
    ax.set_xlabel(X_LABEL[by])
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if by == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def loss_vs(study: Study, by: str, level: float = 0.95) -> Figure:
    """Training loss (raw, faint; smoothed, bold; interval across seeds, shaded) and validation
    loss (markers) of the small and large batch runs, against optimizer steps or tokens seen."""
    fig, ax = new_figure()
    smoothed_top: list[float] = []
    multi = any(len(g.runs) > 1 for g in study.groups)
    for gi, g in enumerate(study.groups):
        color = group_color(study, g)
        for r in g.runs if not multi else []:  # with several seeds the band says enough
            xs = r.step if by == "step" else r.tokens
            ax.plot(xs, r.train_loss, color=color, alpha=0.15, linewidth=0.8)
        c = g.curve(by, level)
        ax.plot(
            c["x"],
            c["mean"],
            color=color,
            linewidth=2,
            label=f"{g.label}: train loss, smoothed ({_seed_note(g)})",
        )
        if len(g.runs) > 1:
            ax.fill_between(
                c["x"],
                c["lo"],
                c["hi"],
                color=color,
                alpha=0.12,
                linewidth=0,
                label=f"{g.label}: {level:.0%} interval of the mean over {len(g.runs)} seeds",
            )
        smoothed_top.append(float(np.nanmax(c["mean"][len(c["mean"]) // 10 :])))
        v = g.val_curve(by, level)
        if len(v["x"]):
            ax.plot(
                v["x"],
                v["mean"],
                color=color,
                linestyle="--",
                marker="o",
                markersize=6,
                label=f"{g.label}: validation loss",
            )
            if len(g.runs) > 1:
                # side by side, not on top of each other: a small shift along x per group
                shift = (gi - (len(study.groups) - 1) / 2) * 0.006 * float(np.nanmax(v["x"]))
                ax.errorbar(
                    v["x"] + shift,
                    v["mean"],
                    yerr=[v["mean"] - v["lo"], v["hi"] - v["mean"]],
                    color=color,
                    linestyle="none",
                    capsize=3,
                    linewidth=1,
                    alpha=0.7,
                )
            smoothed_top.append(float(np.nanmax(v["mean"])))
    # The first steps fall from ln(vocab): keep them from squashing the part that is compared.
    lows = [float(np.nanmin(g.curve(by, level)["mean"])) for g in study.groups]
    lo, hi = min(lows), max(smoothed_top)
    pad = 0.1 * (hi - lo if hi > lo else 1.0)
    ax.set_ylim(lo - pad, hi + 3 * pad)
    if not multi:
        ax.plot(
            [], [], color="grey", alpha=0.4, linewidth=0.8, label="thin: unsmoothed per-step loss"
        )
    what = "per optimizer step (same steps)" if by == "step" else "per token seen (same compute)"
    _style(ax, by, f"Loss {what}")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def difference(study: Study, comparisons: list[dict[str, Any]], level: float = 0.95) -> Figure:
    """large - small smoothed train loss at matched steps and at matched tokens; below zero the
    large batch is ahead. Validation differences at shared validation steps as markers."""
    fig, axes = new_figure(11.0, 4.5, ncols=2)
    for comp in comparisons:
        g = next(g for g in study.large if g.batch_size == comp["large_batch_size"])
        color = group_color(study, g)
        name = f"large {comp['large_batch_size']} − small {comp['small_batch_size']}"
        for ax, key in zip(axes, ("per_step", "per_token")):
            cur = comp["curves"][key]
            x = np.array(cur["grid"], dtype=float)
            ax.plot(x, cur["difference_mean"], color=color, linewidth=2, label=f"{name}, train")
            if not np.allclose(cur["difference_lo"], cur["difference_hi"], equal_nan=True):
                ax.fill_between(
                    x,
                    np.array(cur["difference_lo"], dtype=float),
                    np.array(cur["difference_hi"], dtype=float),
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                    label=f"{name}: {level:.0%} interval over seeds",
                )
        val = [r for r in comp["matched_steps"] if r["metric"] == "val_loss"]
        if val:
            axes[0].plot(
                [r["step"] for r in val],
                [r["difference"] for r in val],
                color=color,
                marker="o",
                linestyle="none",
                markersize=7,
                label=f"{name}, validation",
            )
    for ax, by, title in (
        (axes[0], "step", "At matched optimizer steps"),
        (axes[1], "tokens", "At matched tokens seen"),
    ):
        ax.axhline(0.0, color="black", linewidth=1)
        _style(ax, by, title)
        ax.set_ylabel("large − small loss (nats); below 0: large batch lower")
        ax.legend(fontsize=8, loc="best")
    return fig


def _hline(ax: Axes, y: float | None, text: str, color: str, style: str) -> None:
    if y is None:
        return
    ax.axhline(y, color=color, linestyle=style, linewidth=1.2, label=text)


def _mean_note(n: int) -> str:
    return "" if n <= 1 else f", mean of {n} seeds"


def seed_colors(n: int) -> list[str]:
    """Greys from dark to mid for the superconvergence runs of several seeds."""
    return [SC_COLOR] if n <= 1 else [str(0.15 + 0.45 * i / (n - 1)) for i in range(n)]


def lr_schedules(study: Study) -> Figure:
    """The LR of every run per optimizer step, with x, y and z marked as horizontal lines."""
    fig, ax = new_figure()
    marks = study.selection.marks() if study.selection else {}
    sc = study.superconvergence
    for i, r in enumerate(sc):
        label = None
        if i == 0:
            seeds = ", ".join(str(s.seed) for s in sc)
            label = (
                f"superconvergence, batch {r.batch_size} (seed{'s' if len(sc) > 1 else ''} {seeds})"
            )
        ax.plot(r.step, r.lr, color=SC_COLOR, linewidth=1.5, label=label)
    onsets = [
        (r.record["spike_step"], r.record["unstable_lr"])
        for r in sc
        if r.record.get("spike_step") is not None and r.record.get("unstable_lr") is not None
    ]
    if onsets:
        steps = ", ".join(str(o[0]) for o in onsets)
        ax.plot(
            [o[0] for o in onsets],
            [o[1] for o in onsets],
            marker="X",
            markersize=11,
            color="black",
            linestyle="none",
            label=f"onset of destabilisation (step {steps})",
        )
    for g in study.groups:
        color = group_color(study, g)
        for i, r in enumerate(g.runs):
            ax.plot(
                r.step,
                r.lr,
                color=color,
                linewidth=2,
                alpha=0.9,
                label=f"{g.label} ({_seed_note(g).replace(', mean', '')})" if i == 0 else None,
            )
    x, y = marks["x_unstable_lr"], marks["y_small_lr"]
    _hline(ax, x, f"x = {x or 0:.4g} (unstable LR{_mean_note(len(sc))})", "black", "--")
    _hline(
        ax,
        y,
        f"y = {y or 0:.4g} (small batch peak{_mean_note(len(study.small.runs))})",
        SMALL_COLOR,
        ":",
    )
    for g in study.large:
        z = marks["z_large_lr"].get(g.batch_size)
        _hline(
            ax,
            z,
            f"z = {z or 0:.4g} ({g.label} peak{_mean_note(len(g.runs))})",
            group_color(study, g),
            ":",
        )
    ax.set_xlabel(X_LABEL["step"])
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate schedules, with x, y and z")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def superconvergence(study: Study) -> Figure:
    """The superconvergence curve: smoothed training loss against LR (log scale) during the
    warmup, with the onset x of each seed (and y, z for reference) marked."""
    fig, ax = new_figure()
    marks = study.selection.marks() if study.selection else {}
    tops, lows = [], []
    colors = seed_colors(len(study.superconvergence))
    fired = False
    for r, color in zip(study.superconvergence, colors):
        smooth = r.detector_smoothed if np.isfinite(r.detector_smoothed).sum() > 1 else r.smoothed
        ax.plot(r.lr, r.train_loss, color=color, alpha=0.25, linewidth=0.8)
        x, onset = r.record.get("unstable_lr"), r.record.get("spike_step")
        what = f"x = {x:.4g} at step {onset}" if x is not None else "no destabilisation"
        ax.plot(
            r.lr,
            smooth,
            color=color,
            linewidth=2,
            label=f"batch {r.batch_size}, seed {r.seed}: smoothed train loss; {what}",
        )
        finite = smooth[np.isfinite(smooth)]
        if len(finite):
            tops.append(float(finite.max()))
            lows.append(float(finite.min()))
        if x is not None:
            ax.axvline(x, color=color, linestyle="--", linewidth=1.5)
        alarm = r.record.get("alarm_step")
        if alarm is not None:
            i = int(np.searchsorted(r.step, alarm))
            if i < len(r.step):
                ax.plot(
                    [r.lr[i]],
                    [smooth[i]],
                    marker="v",
                    color="red",
                    markersize=9,
                    linestyle="none",
                    label=None if fired else "detector fired (run stopped)",
                )
                fired = True
    ax.plot([], [], color="black", linestyle="--", label="dashed: onset of destabilisation, x")
    y = marks["y_small_lr"]
    if y is not None:
        ax.axvline(y, color=SMALL_COLOR, linestyle=":", label=f"y = {y:.4g} (small batch peak)")
    for g in study.large:
        z = marks["z_large_lr"].get(g.batch_size)
        if z is not None:
            ax.axvline(z, color=group_color(study, g), linestyle=":",
                       label=f"z = {z:.4g} ({g.label} peak)")  # fmt: skip
    ax.set_xscale("log")
    _lr_ticks(ax, [v for r in study.superconvergence for v in r.lr.tolist()])
    if tops:
        pad = 0.1 * (max(tops) - min(lows) or 1.0)
        ax.set_ylim(min(lows) - pad, max(tops) + 3 * pad)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Superconvergence test: loss while the LR warms up")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _lr_ticks(ax: Axes, lrs: list[float]) -> None:
    """Label a log LR axis at 1-2-5 values (the default labels only powers of ten)."""
    finite = [v for v in lrs if v > 0 and np.isfinite(v)]
    if not finite:
        return
    lo, hi = min(finite), max(finite)
    ticks = [
        m * 10.0**e
        for e in range(int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1)
        for m in (1, 2, 5)
        if lo / 1.5 <= m * 10.0**e <= hi * 1.5
    ]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------- the batch-size ladder


def _noise_marks(ax: Axes, d: dict[str, Any]) -> None:
    """B_simple (with its interval, shaded, where there is one) and the fitted B_crit."""
    est, bc = d.get("noise_scale"), d.get("empirical_critical_batch")
    if est:
        gns = est["value"]
        ax.axvline(gns, color="C3", ls="--", lw=1, label=f"B_simple {gns:.3g}")
        if est.get("interval"):  # shaded within the plotted range: it may span decades
            lo, hi = est["interval"]
            xlim = ax.get_xlim()
            ax.axvspan(
                max(lo, xlim[0]),
                min(hi, xlim[1]),
                color="C3",
                alpha=0.08,
                label=f"B_simple {est['level']:.0%} interval [{lo:.3g}, {hi:.3g}]",
            )
            ax.set_xlim(xlim)
    if bc:
        ax.axvline(bc, color="C2", ls="-.", lw=1, label=f"empirical B_crit {bc:.3g}")


def ladder_loss_at_step(d: dict[str, Any]) -> Figure:
    """Smoothed training loss at fixed steps against batch size (one line per step)."""
    fig, ax = new_figure(6.0, 4.0)
    rungs = d["rungs"]
    bs = [r["batch_size"] for r in rungs]
    for s in d["loss_steps"]:
        ax.plot(bs, [r["loss_at_step"][str(s)] for r in rungs], "o-", label=f"step {s}")
    ax.set_xscale("log", base=2)
    _noise_marks(ax, d)
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("smoothed training loss")
    ax.set_title("Loss at a fixed step against batch size")
    ax.legend(fontsize=8)
    return fig


def ladder_steps_to_target(d: dict[str, Any]) -> Figure:
    """Steps to the target loss against batch size, beside perfect scaling and the fit
    S = S_min (1 + B_crit / B) (McCandlish et al. 2018, eq. 2.11)."""
    fig, ax = new_figure(6.0, 4.0)
    rungs = d["rungs"]
    bs = [r["batch_size"] for r in rungs]
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
    ax.set_xscale("log", base=2)
    _noise_marks(ax, d)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel(f"steps to loss {d['target_loss']:.3f}")
    ax.set_title("Steps to target loss against batch size")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- the stability probe


def stability_probe(rec: dict[str, Any], losses: dict[float, list[float]]) -> Figure:
    """Left: each constant-LR probe's training loss per step (``losses`` by multiple of x).
    Right: final loss against LR with x, the probe boundary and lr_find's suggestion."""
    fig, (ax1, ax2) = new_figure(11.0, 4.0, ncols=2)
    x = rec["unstable_lr"]
    for p in rec["probes"]:
        steps_losses = losses.get(p["multiple"]) or []
        if steps_losses:
            ax1.plot(
                range(1, len(steps_losses) + 1),
                [v if np.isfinite(v) else float("nan") for v in steps_losses],
                lw=1,
                label=f"{p['multiple']:g} x",
            )
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss")
    ax1.set_title("Constant-LR probes")
    ax1.legend(fontsize=8)
    finite = [p for p in rec["probes"] if p["final_loss"] is not None]
    ax2.plot(
        [p["lr"] for p in finite],
        [p["final_loss"] for p in finite],
        "o-",
        color="k",
        label="probe final loss",
    )
    ax2.axvline(x, color="C3", ls="--", label=f"x = {x:.3g}")
    if rec.get("boundary_lr"):
        ax2.axvline(
            rec["boundary_lr"],
            color="C2",
            ls="-.",
            label=f"probe boundary {rec['boundary_lr']:.3g}",
        )
    finder = rec.get("lr_find") or {}
    if finder.get("suggestion"):
        ax2.axvline(
            finder["suggestion"], color="C0", ls=":", label=f"lr_find {finder['suggestion']:.3g}"
        )
    if finder.get("lrs"):
        ax3 = ax2.twinx()
        ax3.plot(
            finder["lrs"],
            [v if v is not None else float("nan") for v in finder["losses"]],
            color="C0",
            lw=0.8,
            alpha=0.6,
        )
        ax3.set_ylabel("lr_find loss", color="C0")
    ax2.set_xscale("log")
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel("final training loss")
    ax2.set_title("Where training stops improving")
    ax2.legend(fontsize=8, loc="upper left")
    return fig
