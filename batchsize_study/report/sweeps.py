"""Report pieces of the LR sweep: sensitivity curves, the tuned comparison, the onset figure.

Each ``*_section(study, ctx)`` is a report section (:mod:`batchsize_study.report.sections`) over
the study's one selection (:mod:`batchsize_study.study.select`): the sweep summaries are recomputed
from the selected point records with :func:`batchsize_study.lr_sensitivity.summarise`, wherever
those points were run (one process, or grid points as jobs of a multirun), and every curve is
read from the study folder itself.

* :func:`sensitivity_section`: final loss against peak LR per batch size, x, y, z, each batch's
  best LR and cliff marked (Wortsman et al. 2023, "Small-scale proxies for large-scale
  Transformer training instabilities", fig. 1).
* :func:`tuned_section`: each batch at its own best LR (Shallue et al. 2018, "Measuring the
  Effects of Data Parallelism on Neural Network Training": compare batch sizes each at its own
  tuned LR), per step and per token, beside the seed rule's y and z.
* :func:`superconvergence_section`: the superconvergence curve (smoothed loss against LR) with
  the onset the study used and the seed's literal onset, replayed from the run's metrics.csv.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import fields
from typing import Any

from batchsize_study.config import DetectorConfig, SweepConfig
from batchsize_study.detector import replay
from batchsize_study.lr_sensitivity import point, relation, summarise
from batchsize_study.metrics import METRICS, read_metrics
from batchsize_study.report.context import ReportContext, Section
from batchsize_study.report.figures import new_figure
from batchsize_study.report.load import Study
from batchsize_study.study import Selection, beside, run_name

COLORS = ("#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd")
RUN_IT = (
    "No LR sweep in this study: `python -m batchsize_study -m experiment=lr_sweep "
    "batch_size=16,64` (after superconvergence) runs one per batch size."
)
TUNED_TOLERANCE = 0.1
"""nats: y 'trains within tolerance of the best swept LR' (the acceptance bar of issue 11)."""


# ---------------------------------------------------------------- loading


def read_rows(rec: dict[str, Any]) -> list[dict[str, float]]:
    """step, tokens, lr, train_loss of every training step of a record's own metrics.csv."""
    m = read_metrics(beside(rec, METRICS))
    return [
        {"step": float(s), "tokens": float(t), "lr": float(lr), "train_loss": float(x)}
        for s, t, lr, x in zip(m.step, m.tokens, m.lr, m.train_loss)
    ]


def sweeps(sel: Selection) -> dict[int, dict[str, Any]]:
    """Per batch size, the sweep's analysis recomputed from the selected point records."""
    default = SweepConfig()
    out: dict[int, dict[str, Any]] = {}
    for bs, recs in sorted(sel.sweeps.items()):
        settings = sel.sweep_settings.get(bs, {})
        window = settings.get("final_window") or default.final_window
        sigmas = settings.get("sigmas") or default.sigmas
        points = [point(r, window) for r in recs]
        xs = [r.get("unstable_lr") for r in recs if r.get("unstable_lr")]
        out[bs] = {
            "batch_size": bs,
            "seeds": sorted({p["seed"] for p in points if p.get("seed") is not None}),
            "max_steps": recs[0].get("max_steps"),
            "unstable_lr": xs[-1] if xs else None,
            "points": points,
            "sigmas": sigmas,
            "final_window": window,
            **summarise(points, sigmas),
        }
    return out


def seed_rule(sel: Selection) -> dict[str, Any]:
    """x as the compared runs used it, the superconvergence record it came from, and the seed
    rule's runs (every compared seed) per batch size."""
    sc = [r for r in sel.superconvergence if r.get("status") == "diverged"]
    runs: dict[int, list[dict[str, Any]]] = {}
    if sel.small_batch is not None:
        runs[sel.small_batch] = list({run_name(p.small): p.small for p in sel.pairs}.values())
    for b, g in sel.large.items():
        recs = [r for s, r in sorted(g.items()) if s in sel.small]
        if recs:
            runs[b] = recs
    return {"x": sel.marks()["x_unstable_lr"], "sc": sc[-1] if sc else None, "runs": runs}


def _f(v: float | None, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


# ---------------------------------------------------------------- (a) sensitivity


def sensitivity_section(study: Study, ctx: ReportContext) -> Section:
    """Final loss against LR per batch size; x, y, z, best LRs and cliffs; the acceptance checks."""
    key, title = "lr_sensitivity", "Final loss against peak LR"
    sel = study.selection
    assert sel is not None
    sw = sweeps(sel)
    if not sw:
        return Section(key, title, RUN_IT, {})
    lines: list[str] = []
    sr = seed_rule(sel)
    x = sr["x"] or next((s["unstable_lr"] for s in sw.values() if s.get("unstable_lr")), None)
    small_bs = min(sw)
    checks: dict[str, Any] = {}
    lines += [
        "Each point is a full training run with the study's schedule and step budget at that peak "
        "LR (Wortsman et al. 2023's LR-sensitivity curve). *Best*: the lowest final val loss. "
        "*Cliff*: the largest LR still within noise of the best, stepping up the grid from it "
        "(noise: see each batch's line).",
        "",
    ]
    for bs, s in sw.items():
        lines += [
            f"**Batch {bs}** ({len(s['points'])} runs, seeds {s.get('seeds')}, "
            f"{s['max_steps']} steps): best LR {_f(s['best_lr'], '.4g')} (final val loss "
            f"{_f(s['best_loss'])} ± {_f(s['best_se'], '.3f')}), cliff {_f(s['cliff_lr'], '.4g')}"
            + (
                f", next grid LR {s['cliff_upper_lr']:.4g} beyond noise"
                if s.get("cliff_upper_lr")
                else " (top of the grid: the true cliff may be higher)"
            )
            + f". Noise: {s['noise_method']}, {s['sigmas']:g} sigmas.",
            "",
            "| peak LR | / x | final val loss ± se | within noise of best | status |",
            "|---|---|---|---|---|",
        ]
        for r in s["per_lr"]:
            loss = "diverged" if r["mean"] is None else f"{r['mean']:.4f} ± {r['se']:.3f}"
            tag = (
                " (best)"
                if r["lr"] == s["best_lr"]
                else " (cliff)"
                if r["lr"] == s["cliff_lr"]
                else ""
            )
            lines.append(
                f"| {r['lr']:.4g}{tag} | {_f(r['lr'] / x if x else None, '.3g')} | {loss} "
                f"| {'yes' if r['within_noise'] else 'no'} | "
                f"{'diverged' if r['diverged'] else 'completed'} |"
            )
        lines.append("")
    small = sw[small_bs]
    if x and small.get("cliff_lr"):
        ratio = x / small["cliff_lr"]
        checks["x_over_small_cliff"] = ratio
        checks["x_within_2x_of_cliff"] = 0.5 <= ratio <= 2.0
        lines.append(
            f"x = {x:.4g} is {relation(x, small['cliff_lr'])} the small batch's cliff "
            f"({small['cliff_lr']:.4g}): {'within' if checks['x_within_2x_of_cliff'] else 'NOT within'}"
            " a factor of 2."
        )
    marks: dict[str, float] = {}
    for bs, recs in sr["runs"].items():
        name = "y" if bs == sel.small_batch else f"z (batch {bs})"
        lr = statistics.fmean(float(r["lr"]) for r in recs)
        marks[name] = lr
        s = sw.get(bs)
        loss, _ = _mean_se([r.get("final_val_loss") for r in recs], [])
        if s is None or s.get("best_loss") is None or loss is None:
            continue
        gap = loss - s["best_loss"]
        checks[f"{name}_loss_minus_best"] = gap
        seeds = f"{len(recs)} seeds, mean" if len(recs) > 1 else f"seed {recs[0].get('seed')}"
        lines.append(
            f"{name} = {lr:.4g} trains to {loss:.4f} ({seeds}), {gap:+.3f} nats from "
            f"batch {bs}'s best swept LR ({relation(lr, s['best_lr'])} it): "
            f"{'within' if gap <= TUNED_TOLERANCE else 'NOT within'} {TUNED_TOLERANCE} nats."
        )
    if x and small.get("best_lr") and "y" in marks:
        # The rule's factor as this model and run length measure it (the best LR drifts below
        # x/2 as the model grows: docs/lr_sweep.md), offered as the setting that uses it.
        k = small["best_lr"] / x
        checks["lr_factor_measured"] = k
        lines.append(
            f"Here the small batch's best swept LR is {k:.3g}·x (y used {marks['y'] / x:.3g}·x). "
            f"To train at it: `-m experiment=small_batch,large_batch lr_factor={k:.3g}` with the "
            "study's other settings (new runs; z follows from the new y, and compare takes the "
            "newest)."
        )
    if x:
        marks = {"x": x, **marks}
    fig, ax = new_figure()
    for i, (bs, s) in enumerate(sw.items()):
        color = COLORS[i % len(COLORS)]
        ok = [r for r in s["per_lr"] if r["mean"] is not None]
        ax.errorbar(
            [r["lr"] for r in ok],
            [r["mean"] for r in ok],
            yerr=[r["se"] for r in ok],
            color=color,
            marker="o",
            capsize=3,
            label=f"batch {bs}",
        )
        bad = [r["lr"] for r in s["per_lr"] if r["mean"] is None]
        if bad:
            top = max((r["mean"] for r in ok), default=1.0)
            ax.plot(bad, [top] * len(bad), "x", color=color, ms=9, label=f"batch {bs}: diverged")
        if s.get("best_lr") is not None:
            ax.plot(s["best_lr"], s["best_loss"], "*", color=color, ms=16, mec="k",
                    label=f"batch {bs}: best {s['best_lr']:.3g}")  # fmt: skip
            cl = next(r for r in s["per_lr"] if r["lr"] == s["cliff_lr"])
            ax.plot(s["cliff_lr"], cl["mean"], "v", color=color, ms=12, mec="k",
                    label=f"batch {bs}: cliff {s['cliff_lr']:.3g}")  # fmt: skip
    styles = ("--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)))
    for j, (name, lr) in enumerate(marks.items()):
        ax.axvline(
            lr, color="#555555", ls=styles[j % len(styles)], lw=1.2, label=f"{name} = {lr:.3g}"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats per token)")
    ax.set_title("Final loss against peak LR")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    png = ctx.save(fig, "lr_sensitivity.png")
    lines += ["", f"![final loss against peak LR]({png})"]
    data = {
        "batches": {str(bs): s for bs, s in sw.items()},
        "marks": marks,
        "checks": checks,
    }
    return Section(key, title, "\n".join(lines).strip(), data, [png])


# ---------------------------------------------------------------- (b) tuned comparison


def loss_at_tokens(rows: list[dict[str, float]], tokens: float, width: float) -> dict[str, Any]:
    """Mean training loss (± se) of the steps whose tokens seen fall in (tokens - width, tokens]."""
    sel = [r["train_loss"] for r in rows if tokens - width < r["tokens"] <= tokens]
    sel = [v for v in sel if math.isfinite(v)]
    if not sel:
        return {"loss": None, "se": None, "n": 0}
    se = statistics.stdev(sel) / math.sqrt(len(sel)) if len(sel) > 1 else None
    return {"loss": statistics.fmean(sel), "se": se, "n": len(sel)}


def _mean_se(values: list[Any], ses: list[Any]) -> tuple[float | None, float | None]:
    """Mean over seeds and its standard error: one seed's own se, else the spread across seeds."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    if len(vals) == 1:
        return vals[0], (ses[0] if len(ses) == 1 else None)
    return statistics.fmean(vals), statistics.stdev(vals) / math.sqrt(len(vals))


def _pair(
    smalls: list[dict[str, Any]], larges: list[dict[str, Any]], window: int
) -> dict[str, Any]:
    """Every seed of each side. Per step: final val losses at the shared step budget. Per token:
    mean training loss over the small runs' last ``window`` steps' tokens, and the large runs'
    steps in the same tokens; each side's mean over its seeds."""
    out: dict[str, Any] = {
        "small_lr": statistics.fmean(float(r["lr"]) for r in smalls),
        "large_lr": statistics.fmean(float(r["lr"]) for r in larges),
        "runs": {"small": [run_name(r) for r in smalls], "large": [run_name(r) for r in larges]},
        "per_step": {"steps": [smalls[0].get("steps_done"), larges[0].get("steps_done")]},
    }
    ps = out["per_step"]
    for who, recs in (("small", smalls), ("large", larges)):
        ps[who], ps[f"{who}_se"] = _mean_se(
            [r.get("final_val_loss") for r in recs], [r.get("final_val_loss_se") for r in recs]
        )
    ps["large_minus_small"] = (
        ps["large"] - ps["small"] if None not in (ps["large"], ps["small"]) else None
    )
    srows = [rows for r in smalls if (rows := read_rows(r))]
    lrows = [rows for r in larges if (rows := read_rows(r))]
    if srows and lrows:
        t = min(rows[-1]["tokens"] for rows in srows)
        tps = smalls[0].get("tokens_per_step") or (t / max(1, srows[0][-1]["step"]))
        width = window * tps
        pt: dict[str, Any] = {"tokens": t}
        for who, side in (("small", srows), ("large", lrows)):
            at = [loss_at_tokens(rows, t, width) for rows in side]
            loss, se = _mean_se([a["loss"] for a in at], [a["se"] for a in at])
            pt[who] = {"loss": loss, "se": se, "n": sum(a["n"] for a in at), "seeds": len(at)}
        diff = (
            pt["large"]["loss"] - pt["small"]["loss"]
            if None not in (pt["large"]["loss"], pt["small"]["loss"])
            else None
        )
        pt["large_minus_small"] = diff
        out["per_token"] = pt
    return out


def _best_runs(sel: Selection, bs: int, s: dict[str, Any]) -> list[dict[str, Any]]:
    """Every seed's run at batch ``bs``'s best swept LR (the best LR is a mean over them)."""
    if s.get("best_lr") is None:
        return []
    return [
        r
        for r in sel.sweeps.get(bs, [])
        if float(r["lr"]) == float(s["best_lr"]) and r.get("status") == "completed"
    ]


def _word(d: float | None) -> str:
    if d is None:
        return "n/a"
    return "lower" if d < 0 else "higher"


def tuned_section(study: Study, ctx: ReportContext, window: int = 20) -> Section:
    """Each batch at its own best swept LR beside the seed rule's y and z (Shallue et al. 2018),
    every seed of each side."""
    key, title = "tuned", "Each batch at its own best LR"
    sel = study.selection
    assert sel is not None
    sw = sweeps(sel)
    if len(sw) < 2:
        return Section(key, title, RUN_IT + "\n(needs a sweep at two batch sizes)", {})
    sr = seed_rule(sel)
    lines: list[str] = []
    small_bs, large_bss = min(sw), [b for b in sw if b != min(sw)]
    data: dict[str, Any] = {"seed_rule": {}, "tuned": {}, "sentences": {}}
    lines += [
        "Shallue et al. (2018) compare batch sizes each at its own tuned LR: a verdict that holds "
        "only at one rule's LRs measures the rule, not the batch size. Per step: final val loss "
        f"after the same optimizer steps. Per token: mean training loss over the small run's last "
        f"{window} steps' tokens, and the large run's steps within the same tokens (each step a "
        "fresh batch, so this is a held-out estimate).",
        "",
        "| comparison | LRs (small / large) | per step: small, large, large − small "
        "| per token: small, large, large − small |",
        "|---|---|---|---|",
    ]
    sentences = []
    fig, axes = new_figure(10.0, 4.0, ncols=2)
    for lb in large_bss:
        rows: dict[str, dict[str, Any]] = {}
        if small_bs in sr["runs"] and lb in sr["runs"]:
            rows["seed rule (y, z)"] = _pair(sr["runs"][small_bs], sr["runs"][lb], window)
        bs_small, bs_large = _best_runs(sel, small_bs, sw[small_bs]), _best_runs(sel, lb, sw[lb])
        if bs_small and bs_large:
            rows["each at its best swept LR"] = _pair(bs_small, bs_large, window)
        for name, r in rows.items():
            ps, pt = r["per_step"], r.get("per_token") or {}
            tok = (
                f"{_f(pt['small']['loss'])}, {_f(pt['large']['loss'])}, "
                f"{_f(pt['large_minus_small'], '+.3f')}"
                if pt
                else "n/a"
            )
            lines.append(
                f"| batch {small_bs} vs {lb}: {name} | {r['small_lr']:.4g} / {r['large_lr']:.4g} "
                f"| {_f(ps['small'])}, {_f(ps['large'])}, {_f(ps['large_minus_small'], '+.3f')} "
                f"| {tok} |"
            )
        seed = rows.get("seed rule (y, z)")
        tuned = rows.get("each at its best swept LR")
        data["seed_rule"][str(lb)] = seed
        data["tuned"][str(lb)] = tuned
        sentence = _sentence(small_bs, lb, seed, tuned, sw[small_bs], sw[lb])
        sentences.append(sentence)
        data["sentences"][str(lb)] = sentence
        _plot_pair(axes, rows, small_bs, lb)
    lines += ["", *sentences]
    data["sentence"] = sentences[0]
    png = ctx.save(fig, "tuned_comparison.png")
    lines += ["", f"![each batch at its own best LR]({png})"]
    return Section(key, title, "\n".join(lines).strip(), data, [png])


def _sentence(
    small_bs: int,
    large_bs: int,
    seed: dict[str, Any] | None,
    tuned: dict[str, Any] | None,
    s_sweep: dict[str, Any],
    l_sweep: dict[str, Any],
) -> str:
    """One sentence: does the seed's per-step verdict survive tuning, and where y and z sit."""
    if tuned is None:
        return f"Batch {small_bs} vs {large_bs}: no best LR for both batch sizes (every point diverged)."
    td = tuned["per_step"]["large_minus_small"]
    where = (
        f"the seed's y = {tuned_y(seed):.4g} is {relation(tuned_y(seed), s_sweep['best_lr'])} "
        f"the small batch's best LR ({s_sweep['best_lr']:.4g}) and z = {seed['large_lr']:.4g} is "
        f"{relation(seed['large_lr'], l_sweep['best_lr'])} the large batch's ({l_sweep['best_lr']:.4g})"
        if seed
        else "the seed rule's runs are missing, so y and z cannot be placed"
    )
    if seed is None or seed["per_step"]["large_minus_small"] is None or td is None:
        return f"Per step at each batch's best LR the large batch is {_word(td)} by {abs(td or 0):.3f} nats; {where}."
    sd = seed["per_step"]["large_minus_small"]
    survives = (sd < 0) == (td < 0)
    return (
        f"The seed's verdict (batch {large_bs} {_word(sd)} than batch {small_bs} per step, by "
        f"{abs(sd):.3f} nats) {'survives' if survives else 'does NOT survive'} tuning (at each "
        f"batch's own best LR it is {_word(td)} by {abs(td):.3f} nats); {where}."
    )


def tuned_y(seed: dict[str, Any] | None) -> float:
    return seed["small_lr"] if seed else math.nan


def _plot_pair(axes: Any, rows: dict[str, dict[str, Any]], small_bs: int, large_bs: int) -> None:
    """Points with standard errors (where known), not bars: the losses do not start at zero."""
    panels = (
        (axes[0], "per_step", "per optimizer step (final val loss)"),
        (axes[1], "per_token", "per token (training loss at equal tokens)"),
    )
    names = list(rows)
    for ax, key, title in panels:
        for k, (who, bs, color) in enumerate(
            (("small", small_bs, COLORS[0]), ("large", large_bs, COLORS[1]))
        ):
            xs, ys, es = [], [], []
            for i, n in enumerate(names):
                part = rows[n].get(key) or {}
                v = part.get(who)
                loss = v.get("loss") if isinstance(v, dict) else v
                if loss is None:
                    continue
                se = v.get("se") if isinstance(v, dict) else part.get(f"{who}_se")
                xs.append(i + (k - 0.5) * 0.2)
                ys.append(loss)
                es.append(se if se is not None and math.isfinite(se) else 0.0)
            ax.errorbar(xs, ys, yerr=es, fmt="o", ms=8, capsize=4, color=color,
                        label=f"batch {bs}")  # fmt: skip
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)


# ---------------------------------------------------------------- superconvergence onsets


def _detector_cfg(rec: dict[str, Any], **override: Any) -> DetectorConfig:
    known = {f.name for f in fields(DetectorConfig)}
    saved = {k: v for k, v in (rec.get("detector") or {}).items() if k in known}
    return DetectorConfig(**{**saved, **override})


def superconvergence_section(study: Study, ctx: ReportContext) -> Section:
    """The superconvergence curve with the study's onset and the seed's literal onset."""
    key, title = "onsets", "Where x is read: the superconvergence curve"
    sel = study.selection
    assert sel is not None
    sr = seed_rule(sel)
    rec = sr["sc"]
    if rec is None:
        return Section(key, title, "No diverged superconvergence record in this study.", {})
    lines: list[str] = []
    rows = read_rows(rec)
    triples = [(int(r["step"]), r["lr"], r["train_loss"]) for r in rows]
    used = _detector_cfg(rec)
    onsets: dict[str, dict[str, Any]] = {}
    smoothed: list[float] = []
    rules = {used.onset + ("+lag" if used.lag_correction else ""): used}
    for onset in ("rise", "min_loss", "plateau"):
        for lag in (False, True):
            name = onset + ("+lag" if lag else "")
            rules.setdefault(name, _detector_cfg(rec, onset=onset, lag_correction=lag))
    for name, cfg in rules.items():
        v, sm = replay(triples, cfg)
        smoothed = smoothed or sm
        onsets[name] = {
            "onset_step": v.onset_step,
            "onset_lr": v.onset_lr,
            "alarm_step": v.alarm_step,
        }
    sw = sweeps(sel)
    cliff = sw[min(sw)]["cliff_lr"] if sw else None
    lines += [
        f"Warmup: {rec.get('warmup_shape', 'linear')}, stopped at step {rec.get('alarm_step')} "
        f"(lr {max(r['lr'] for r in rows):.3g}); the record's x = {rec['unstable_lr']:.4g} (onset "
        f"rule {rec.get('onset_definition', 'rise')}). Every rule below reads the same run (its "
        "metrics.csv replayed through the detector); they differ only in which step is the onset.",
        "",
        "| onset rule | step | LR | / small-batch cliff |",
        "|---|---|---|---|",
    ]
    for name, o in onsets.items():
        label = "rise (the seed's literal reading)" if name == "rise" else name
        label += " (used)" if o is onsets[next(iter(onsets))] else ""
        lines.append(
            f"| {label} | {o['onset_step']} | {_f(o['onset_lr'], '.4g')} "
            f"| {_f(o['onset_lr'] / cliff if (cliff and o['onset_lr']) else None, '.3g')} |"
        )
    fig, ax = new_figure()
    lrs = [r["lr"] for r in rows][: len(smoothed)]
    ax.plot([r["lr"] for r in rows], [r["train_loss"] if math.isfinite(r["train_loss"]) else math.nan
            for r in rows], color="#999999", lw=0.6, alpha=0.6, label="training loss")  # fmt: skip
    ax.plot(lrs, smoothed, color=COLORS[0], lw=2, label="smoothed (EMA, bias-corrected)")
    shown = {k: onsets[k] for k in dict.fromkeys([next(iter(onsets)), "rise"])}
    for (name, o), color, ls in zip(shown.items(), (COLORS[1], COLORS[3]), ("--", ":")):
        if o["onset_lr"]:
            ax.axvline(o["onset_lr"], color=color, ls=ls, lw=1.5,
                       label=f"onset {name}: {o['onset_lr']:.3g}")  # fmt: skip
    if cliff:
        ax.axvline(cliff, color="k", ls="-.", lw=1, label=f"small-batch sweep cliff {cliff:.3g}")
    ax.set_xscale("log")
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) - 0.3, max(finite[len(finite) // 10 :] or finite) + 0.5)
    ax.set_xlabel("learning rate (warmup)")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title("Superconvergence run: loss against LR")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    png = ctx.save(fig, "superconvergence_onsets.png")
    lines += ["", f"![superconvergence onsets]({png})"]
    data = {
        "run_id": run_name(rec),
        "unstable_lr": rec["unstable_lr"],
        "onsets": onsets,
        "small_cliff": cliff,
    }
    return Section(key, title, "\n".join(lines).strip(), data, [png])
