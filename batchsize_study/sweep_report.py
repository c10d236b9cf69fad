"""Report pieces of the LR sweep: sensitivity curves, the tuned comparison, the onset figure.

Each ``*_section(study_dir, out_dir)`` returns ``(markdown, json-able dict, PNG paths)`` from the
study's records alone (the sweep summaries are recomputed from their points with
:func:`batchsize_study.lr_sensitivity.summarise`), so the report can place them where it likes.

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
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from batchsize_study.config import DetectorConfig
from batchsize_study.detector import replay
from batchsize_study.lr_sensitivity import SUMMARY, relation, summarise
from batchsize_study.metrics import read_metrics
from batchsize_study.study import read_records

COLORS = ("#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd")
RUN_IT = (
    "No LR sweep in this study: `python -m batchsize_study -m experiment=lr_sweep "
    "batch_size=16,64` (after superconvergence) runs one per batch size."
)
TUNED_TOLERANCE = 0.1
"""nats: y 'trains within tolerance of the best swept LR' (the acceptance bar of issue 11)."""


# ---------------------------------------------------------------- loading


def read_rows(path: str | Path) -> list[dict[str, float]]:
    """step, tokens, lr, train_loss of every training step, from the one metrics.csv reader."""
    m = read_metrics(path)
    return [
        {"step": float(s), "tokens": float(t), "lr": float(lr), "train_loss": float(x)}
        for s, t, lr, x in zip(m.step, m.tokens, m.lr, m.train_loss)
    ]


def sweeps(study_dir: str | Path) -> dict[int, dict[str, Any]]:
    """The newest sweep summary per batch size, its analysis recomputed from its points."""
    out: dict[int, dict[str, Any]] = {}
    for rec in read_records(study_dir, SUMMARY):  # oldest first: the newest wins
        out[int(rec["batch_size"])] = {**rec, **summarise(rec["points"], rec.get("sigmas", 2.0))}
    return dict(sorted(out.items()))


def seed_rule(study_dir: str | Path) -> dict[str, Any]:
    """x, and the newest completed small_batch (y) and large_batch (z) records per batch size."""
    sc = [r for r in read_records(study_dir, "superconvergence") if r.get("status") == "diverged"]
    x = sc[-1]["unstable_lr"] if sc else None
    runs: dict[int, dict[str, Any]] = {}
    for exp in ("small_batch", "large_batch"):
        done = [r for r in read_records(study_dir, exp) if r.get("status") == "completed"]
        # runs derived from this x first (a study may hold runs from an earlier x), newest last
        done.sort(key=lambda r: r.get("unstable_lr") == x)
        for r in done:
            runs[int(r["batch_size"])] = r
    return {"x": x, "sc": sc[-1] if sc else None, "runs": runs}


def _figure(w: float = 8.0, h: float = 5.0, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)  # Agg renders the PNG; no pyplot
    return fig, fig.subplots(1, ncols)


def _save(fig: Figure, out_dir: str | Path, name: str) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=120)
    return str(path)


def _f(v: float | None, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


# ---------------------------------------------------------------- (a) sensitivity


def sensitivity_section(
    study_dir: str | Path, out_dir: str | Path
) -> tuple[str, dict[str, Any], list[str]]:
    """Final loss against LR per batch size; x, y, z, best LRs and cliffs; the acceptance checks."""
    sw = sweeps(study_dir)
    lines = ["## Final loss against peak LR (LR sweep)", ""]
    if not sw:
        return "\n".join([*lines, RUN_IT]) + "\n", {}, []
    sr = seed_rule(study_dir)
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
    for bs, rec in sr["runs"].items():
        name = "y" if rec["experiment"] == "small_batch" else f"z (batch {bs})"
        marks[name] = rec["lr"]
        s = sw.get(bs)
        if s is None or s.get("best_loss") is None or rec.get("final_val_loss") is None:
            continue
        gap = rec["final_val_loss"] - s["best_loss"]
        checks[f"{name}_loss_minus_best"] = gap
        lines.append(
            f"{name} = {rec['lr']:.4g} trains to {rec['final_val_loss']:.4f}, {gap:+.3f} nats from "
            f"batch {bs}'s best swept LR ({relation(rec['lr'], s['best_lr'])} it): "
            f"{'within' if gap <= TUNED_TOLERANCE else 'NOT within'} {TUNED_TOLERANCE} nats."
        )
    if x:
        marks = {"x": x, **marks}
    fig, ax = _figure()
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
    png = _save(fig, out_dir, "lr_sensitivity.png")
    lines += ["", "![final loss against peak LR](lr_sensitivity.png)"]
    data = {
        "batches": {str(bs): {k: v for k, v in s.items() if k != "_path"} for bs, s in sw.items()},
        "marks": marks,
        "checks": checks,
    }
    return "\n".join(lines) + "\n", data, [png]


# ---------------------------------------------------------------- (b) tuned comparison


def loss_at_tokens(rows: list[dict[str, float]], tokens: float, width: float) -> dict[str, Any]:
    """Mean training loss (± se) of the steps whose tokens seen fall in (tokens - width, tokens]."""
    sel = [r["train_loss"] for r in rows if tokens - width < r["tokens"] <= tokens]
    sel = [v for v in sel if math.isfinite(v)]
    if not sel:
        return {"loss": None, "se": None, "n": 0}
    se = statistics.stdev(sel) / math.sqrt(len(sel)) if len(sel) > 1 else None
    return {"loss": statistics.fmean(sel), "se": se, "n": len(sel)}


def _pair(small: dict[str, Any], large: dict[str, Any], window: int) -> dict[str, Any]:
    """Per step: final val losses at the shared step budget. Per token: mean training loss over
    the small run's last ``window`` steps' tokens, and the large run's steps in the same tokens."""
    srows, lrows = read_rows(small["metrics_csv"]), read_rows(large["metrics_csv"])
    out: dict[str, Any] = {
        "small_lr": small["lr"],
        "large_lr": large["lr"],
        "per_step": {
            "small": small.get("final_val_loss"),
            "large": large.get("final_val_loss"),
            "small_se": small.get("final_val_loss_se"),
            "large_se": large.get("final_val_loss_se"),
            "steps": [small.get("steps_done"), large.get("steps_done")],
        },
    }
    ps = out["per_step"]
    ps["large_minus_small"] = (
        ps["large"] - ps["small"] if None not in (ps["large"], ps["small"]) else None
    )
    if srows and lrows:
        t = srows[-1]["tokens"]
        width = window * (small.get("tokens_per_step") or (t / max(1, srows[-1]["step"])))
        s_at, l_at = loss_at_tokens(srows, t, width), loss_at_tokens(lrows, t, width)
        diff = l_at["loss"] - s_at["loss"] if None not in (l_at["loss"], s_at["loss"]) else None
        out["per_token"] = {"tokens": t, "small": s_at, "large": l_at, "large_minus_small": diff}
    return out


def _best_run(s: dict[str, Any]) -> dict[str, Any] | None:
    """The best LR's run (its lowest-loss seed) as a record-like dict."""
    pts = [
        p
        for p in s["points"]
        if p["lr"] == s["best_lr"] and p.get("final_loss") is not None and p.get("metrics_csv")
    ]
    if not pts:
        return None
    p = min(pts, key=lambda q: q["final_loss"])
    return {
        "lr": p["lr"],
        "final_val_loss": s["best_loss"],  # the mean over seeds, as the sweep reports it
        # One seed: that run's validation SE; several: the sweep's se of the mean over seeds.
        "final_val_loss_se": p.get("val_se") if len(pts) == 1 else s.get("best_se"),
        "metrics_csv": p["metrics_csv"],
        "steps_done": s["max_steps"],
        "tokens_per_step": None,
    }


def _word(d: float | None) -> str:
    if d is None:
        return "n/a"
    return "lower" if d < 0 else "higher"


def tuned_section(
    study_dir: str | Path, out_dir: str | Path, window: int = 20
) -> tuple[str, dict[str, Any], list[str]]:
    """Each batch at its own best swept LR beside the seed rule's y and z (Shallue et al. 2018)."""
    sw = sweeps(study_dir)
    lines = ["## Each batch at its own best LR", ""]
    if len(sw) < 2:
        return "\n".join([*lines, RUN_IT, "(needs a sweep at two batch sizes)"]) + "\n", {}, []
    sr = seed_rule(study_dir)
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
    fig, axes = _figure(10.0, 4.0, ncols=2)
    for lb in large_bss:
        rows: dict[str, dict[str, Any]] = {}
        if small_bs in sr["runs"] and lb in sr["runs"]:
            rows["seed rule (y, z)"] = _pair(sr["runs"][small_bs], sr["runs"][lb], window)
        bs_small, bs_large = _best_run(sw[small_bs]), _best_run(sw[lb])
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
    png = _save(fig, out_dir, "tuned_comparison.png")
    lines += ["", "![each batch at its own best LR](tuned_comparison.png)"]
    return "\n".join(lines) + "\n", data, [png]


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


def superconvergence_section(
    study_dir: str | Path, out_dir: str | Path
) -> tuple[str, dict[str, Any], list[str]]:
    """The superconvergence curve with the study's onset and the seed's literal onset."""
    sr = seed_rule(study_dir)
    rec = sr["sc"]
    lines = ["## Where the superconvergence run destabilised", ""]
    if rec is None:
        return (
            "\n".join([*lines, "No diverged superconvergence record in this study."]) + "\n",
            {},
            [],
        )
    rows = read_rows(rec["metrics_csv"])
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
    sw = sweeps(study_dir)
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
    fig, ax = _figure()
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
    png = _save(fig, out_dir, "superconvergence_onsets.png")
    lines += ["", "![superconvergence onsets](superconvergence_onsets.png)"]
    data = {"unstable_lr": rec["unstable_lr"], "onsets": onsets, "small_cliff": cliff}
    return "\n".join(lines) + "\n", data, [png]
