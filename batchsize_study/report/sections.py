"""The report's sections: a plain ordered list (:data:`SECTIONS`) of functions
``(study, ctx) -> Section | None``. Each returns markdown for report.md, a JSON object stored
under its key in comparison.json, and the PNG files it wrote. To add a section, write one such
function and put it in the list (or pass your own list to ``build_report(sections=...)``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from batchsize_study import ladder
from batchsize_study.metrics import METRICS, read_metrics
from batchsize_study.probe_analysis import optimum_at_lowest_multiple
from batchsize_study.report import figures, sweeps
from batchsize_study.report.compare import (
    HYPOTHESIS,
    diagnose,
    overall,
    verdict_for,
)
from batchsize_study.report.context import ReportContext, Section, SectionFn
from batchsize_study.report.evaluation import evaluate_section
from batchsize_study.report.evidence import checked_table, rule_evidence
from batchsize_study.report.load import Study, load_ladder
from batchsize_study.stats import fmt
from batchsize_study.study import Selection, beside, run_name
from batchsize_study.study.stages import STABILITY_PROBE

# ---------------------------------------------------------------- runs


def _short_source(src: str | None) -> str:
    """lr_source without the record paths (they are in comparison.json)."""
    if not src:
        return "n/a"
    return re.sub(r" from /\S+(, /\S+)*", "", src).replace("|", "/")


def run_rows(study: Study) -> list[dict[str, Any]]:
    """One row per run of the study (superconvergence included), for the table."""
    rows = []
    shown = {r.run_id for r in study.runs} | {r.run_id for r in study.superconvergence}
    for rec in study.records:
        rid = rec.get("run_id") or Path(rec["_path"]).parent.name
        if rid not in shown:
            continue
        ppl = rec.get("final_val_ppl")
        if ppl is None and rec.get("final_val_loss") is not None:
            ppl = math.exp(min(rec["final_val_loss"], 700))
        rows.append(
            {
                "run_id": rid,
                "experiment": rec.get("experiment"),
                "status": rec.get("status"),
                "seed": rec.get("seed"),
                "batch_size": rec.get("batch_size"),
                "micro_batch_size": rec.get("micro_batch_size"),
                "accumulate_grad_batches": rec.get("accumulate_grad_batches"),
                "devices": rec.get("devices"),
                "lr": rec.get("lr"),
                "lr_source": rec.get("lr_source"),
                "unstable_lr": rec.get("unstable_lr"),
                "steps_done": rec.get("steps_done"),
                "tokens_seen": rec.get("tokens_seen"),
                "final_train_loss": rec.get("final_train_loss"),
                "final_val_loss": rec.get("final_val_loss"),
                "final_val_loss_se": rec.get("final_val_loss_se"),
                "final_val_ppl": ppl,
                "wall_seconds": rec.get("wall_seconds"),
            }
        )
    return rows


def _with_se(value: float | None, se: float | None) -> str:
    """'5.9090 ± 0.0123' where the record has the standard error, else the value alone."""
    return fmt(value) if se is None or value is None else f"{fmt(value)} ± {fmt(se)}"


def runs_table_markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| run | seed | status | batch | micro × accum × devices | peak LR | LR from | steps | tokens "
        "| final train loss | final val loss | val ppl | wall time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['experiment']} | {r['seed']} | {r['status']} | {r['batch_size']} "
        f"| {r['micro_batch_size']} × {r['accumulate_grad_batches']} × {r['devices']} "
        f"| {fmt(r['lr'], '.4g')} | {_short_source(r['lr_source'])} | {r['steps_done']} "
        f"| {fmt(r['tokens_seen'], ',.0f')} | {fmt(r['final_train_loss'])} "
        f"| {_with_se(r['final_val_loss'], r['final_val_loss_se'])} "
        f"| {fmt(r['final_val_ppl'], '.1f')} "
        f"| {fmt(r['wall_seconds'], '.1f')} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def section_runs(study: Study, ctx: ReportContext) -> Section:
    rows = run_rows(study)
    md = runs_table_markdown(rows)
    md += (
        "\n\nFinal train loss: mean of the last 10 optimizer steps. Final val loss ± its "
        "standard error over the validation windows, where the run recorded it. Batch sizes are "
        "effective batches in sequences (micro batch × gradient accumulation × devices)."
    )
    if study.ignored:
        md += "\n\nNot compared: " + "; ".join(study.ignored) + "."
    return Section("runs", "Runs", md, rows)


# ---------------------------------------------------------------- verdict and curves


def section_verdict(study: Study, ctx: ReportContext) -> Section:
    s = ctx.settings
    comps = [verdict_for(study, g, s) for g in study.large]
    data = {
        "hypothesis": HYPOTHESIS,
        "overall_per_step": overall([c["per_step_verdict"] for c in comps]),
        "overall_per_token": overall([c["per_token_verdict"] for c in comps]),
        "one_seed": all(len(g.runs) == 1 for g in study.groups),
        "metric_note": (
            "matched steps use the validation loss where both runs evaluated at that step, "
            f"else the training loss smoothed by a bias-corrected EMA (factor {s.ema}); per "
            f"token the EMA spans the same tokens in every run (factor {s.ema}^(tokens per "
            f"step / the small batch's tokens per step) per step), so a larger batch is not "
            "smoothed over more tokens"
        ),
        "comparisons": comps,
    }
    md = [f"Hypothesis (the seed's): *{HYPOTHESIS}*.", ""]
    md += [c["text"] + "\n" for c in comps]
    md.append(f"_{data['metric_note']}._")
    for c in comps:
        md.append(
            f"\n**Matched steps, large batch {c['large_batch_size']} − small batch "
            f"{c['small_batch_size']}** (negative = the large batch is lower):\n"
        )
        md.append("| step | loss used | small | large | large − small | relative |")
        md.append("|---|---|---|---|---|---|")
        for r in c["matched_steps"]:
            md.append(
                f"| {r['step']} | {'val' if r['metric'] == 'val_loss' else 'smoothed train'} "
                f"| {r['small']:.4f} | {r['large']:.4f} | {r['difference']:+.4f} "
                f"| {fmt(r['relative'], '+.1%')} |"
            )
    ctx.results["verdict"] = data
    return Section("verdict", "Verdict", "\n".join(md), data)


def section_curves(study: Study, ctx: ReportContext) -> Section:
    s = ctx.settings
    files = [
        ctx.save(figures.loss_vs(study, "step", s.confidence), "loss_vs_step.png"),
        ctx.save(figures.loss_vs(study, "tokens", s.confidence), "loss_vs_tokens.png"),
    ]
    comps = ctx.results.get("verdict", {}).get("comparisons") or [
        verdict_for(study, g, s) for g in study.large
    ]
    files.append(ctx.save(figures.difference(study, comps, s.confidence), "loss_difference.png"))
    curves = {
        g.label: {
            "seeds": g.seeds,
            "per_step": {k: v.tolist() for k, v in g.curve("step", s.confidence).items()},
            "per_token": {k: v.tolist() for k, v in g.curve("tokens", s.confidence).items()},
            "val_per_step": {k: v.tolist() for k, v in g.val_curve("step", s.confidence).items()},
            "val_per_token": {
                k: v.tolist() for k, v in g.val_curve("tokens", s.confidence).items()
            },
        }
        for g in study.groups
    }
    md = "\n\n".join(
        [
            "Smoothed training loss (lines; shaded: "
            f"{s.confidence:.0%} interval across seeds where there are several) and validation loss "
            "(markers), against optimizer steps (the seed's question) and against tokens seen "
            "(compute-fair).",
            "![loss vs step](loss_vs_step.png)",
            "![loss vs tokens](loss_vs_tokens.png)",
            "Difference large − small at matched steps and at matched tokens (below zero: the "
            "large batch is lower).",
            "![difference](loss_difference.png)",
        ]
    )
    return Section("curves", "Loss curves", md, curves, files)


def section_schedules(study: Study, ctx: ReportContext) -> Section:
    files = [ctx.save(figures.lr_schedules(study), "lr_schedules.png")]
    md = (
        "The learning rate of every run per optimizer step, with x (the measured unstable LR), "
        "y (small batch peak) and z (large batch peak) marked.\n\n![LR schedules](lr_schedules.png)"
    )
    if study.superconvergence:
        files.append(ctx.save(figures.superconvergence(study), "superconvergence.png"))
        md += (
            "\n\nThe superconvergence run: smoothed training loss against the learning rate "
            "(log scale) during the warmup, with the onset of the destabilisation (x) marked."
            "\n\n![superconvergence](superconvergence.png)"
        )
    marks = study.selection.marks()
    n = marks.get("x_runs")
    if n:
        md += f"\n\nx rests on {n} superconvergence run{'s' if n > 1 else ''}" + (
            " (their median; `x_from=median`)."
            if n > 1
            else ": one seed's x scatters by about a factor of 2 (docs/lr_sweep.md); "
            "`-m experiment=superconvergence seed=0,1,2` then `x_from=median` rests it on three."
        )
    warning = horizon_warning(marks)
    if warning:
        md = f"**Warning: {warning}**\n\n" + md
    sel = study.selection
    smalls = list(sel.small.values())
    evidence = rule_evidence(
        max((r.get("flops_per_token") or 0 for r in smalls), default=0) or None,
        marks.get("planned_steps"),
        bool(sel.sweeps.get(sel.small_batch or 0)),
    )
    warn = evidence["outside"] and not evidence["own_sweep"]
    md += f"\n\n**{evidence['note']}**" if warn else f"\n\n{evidence['note']}"
    md += "\n\n" + checked_table()
    return Section("schedules", "Learning rates", md, {**marks, "rule_evidence": evidence}, files)


HORIZON_RATIO = 2.0
"""A planned run this many times longer than the onset step x was read at gets a warning."""


def horizon_warning(marks: dict[str, Any]) -> str | None:
    """A sentence when the compared runs train much longer than the horizon x was read at."""
    read, planned = marks.get("x_read_at_step"), marks.get("planned_steps")
    if not read or not planned or planned < HORIZON_RATIO * read:
        return None
    return (
        f"the compared runs train {planned} steps, {planned / read:.1f}x the step at which x was "
        f"read ({read}, in the superconvergence warmup). A longer run may break at a lower LR than "
        "the ramp shows; on the default study a 4x longer run kept its best LR and cliff on the "
        "same grid points (docs/lr_sweep.md), other models and data are not measured. Check y "
        f"with a short LR sweep at the planned length (`experiment=lr_sweep max_steps={planned}`)"
    )


def section_diagnostics(study: Study, ctx: ReportContext) -> Section:
    diags = [diagnose(r, ctx.settings.overfit_tolerance) for r in study.runs]
    md_lines = []
    for r, d in zip(study.runs, diags):
        warn = r.record.get("instability_warning")
        if d["flag"]:
            md_lines.append(f"- **{r.run_id}: {d['flag']}** — {d['note']}.")
        if warn:
            md_lines.append(
                f"- **{r.run_id}**: the training loss rose at step {warn.get('onset_step')} "
                f"(LR {fmt(warn.get('onset_lr'), '.4g')}): {warn.get('reason')}."
            )
    if not md_lines:
        md_lines.append(
            "No run shows overfitting (validation loss rising above its minimum by more than "
            f"{ctx.settings.overfit_tolerance:.0%} while the training loss falls) or a "
            "destabilisation."
        )
    return Section("diagnostics", "Overfitting or destabilisation", "\n".join(md_lines), diags)


# ---------------------------------------------------------------- ladder


def section_ladder(study: Study, ctx: ReportContext) -> Section:
    """Loss and steps-to-target against batch size, beside the gradient noise scale."""
    assert study.selection is not None
    return ladder_section(study.selection, ctx)


def ladder_section(sel: Selection, ctx: ReportContext) -> Section:
    """The ladder section over the selection's rungs (a ladder needs no small/large pairing)."""
    d = load_ladder(sel, level=ctx.settings.confidence)
    md = ladder_markdown(d)
    files = []
    if len(d["rungs"]) >= 2:
        files = [
            ctx.save(figures.ladder_loss_at_step(d), "ladder_loss_at_step.png"),
            ctx.save(figures.ladder_steps_to_target(d), "ladder_steps_to_target.png"),
        ]
        md += "\n" + "\n".join(f"\n![{Path(name).stem}]({name})" for name in files)
    return Section("ladder", "Batch-size ladder", md, ladder.public(d), files)


def _noise_lines(d: dict[str, Any]) -> list[str]:
    """B_simple with its uncertainty, and a regime per rung only where the interval supports it."""
    est = d.get("noise_scale")
    if not est:
        return []
    lines = [
        f"Gradient noise scale B_simple (McCandlish et al. 2018, the estimate of the critical "
        f"batch): **{est['value']:.3g} sequences**"
        + (
            f", {est['level']:.0%} interval [{est['interval'][0]:.3g}, {est['interval'][1]:.3g}]"
            if est.get("interval")
            else ""
        )
        + f" ({est['method']}; per seed: "
        + ", ".join(f"{v:.3g}" for v in est["per_seed"].values())
        + ")."
    ]
    for r in d["rungs"]:
        where = r["noise_regime"]
        what = f"- batch {r['batch_size']} ({', '.join(r['experiments'])})"
        if where == "uncertain":
            lines.append(
                f"{what}: the estimate is too uncertain to say whether it is below, near or "
                "above the noise scale"
            )
        else:
            lines.append(f"{what} is **{where}** the noise scale (over its whole interval)")
    lines.append("")
    return lines


def ladder_markdown(d: dict[str, Any]) -> str:
    """The ladder's text and table (figures aside)."""
    rungs = d["rungs"]
    if not rungs:
        return f"No ladder: {d.get('note')}."
    lines: list[str] = []
    est = d.get("noise_scale") or {}
    lines += _noise_lines(d)
    if len(rungs) < 2:
        lines.append(
            "One batch size only: run `-m experiment=large_batch batch_size=…` over several sizes "
            "for the ladder."
        )
        return "\n".join(lines).strip()
    steps_cols = d["loss_steps"]
    lines += [
        f"Same step budget ({d['max_steps']} optimizer steps); smoothed training loss (EMA "
        f"{d['smoothing']}). Target loss for steps-to-target: {d['target_loss']:.4f} "
        f"({d['target_rule']}).",
        "",
        "| batch | lr | "
        + " | ".join(f"loss @ {s}" for s in steps_cols)
        + " | steps to target | efficiency | regime (Shallue et al. 2018) | B_simple |",
        "|" + "---|" * (len(steps_cols) + 6),
    ]
    for r in rungs:
        reached = r["steps_to_target"] if r["steps_to_target"] is not None else "not reached"
        lines.append(
            f"| {r['batch_size']} | {r['lr']:.4g} | "
            + " | ".join(fmt(r["loss_at_step"][str(s)]) for s in steps_cols)
            + f" | {reached} | {fmt(r['efficiency'], '.2f')} | {r['regime'] or '–'} "
            + f"| {fmt(r['gradient_noise_scale'], '.3g')} |"
        )
    bc = d["empirical_critical_batch"]
    lines += [
        "",
        (
            f"Fit S = S_min (1 + B_crit/B) (McCandlish et al. 2018, eq. 2.11), "
            f"{d['fit_note']}: S_min = {d['fit']['s_min']:.3g} steps, empirical critical batch "
            f"**B_crit = {bc:.3g}** sequences"
            + (
                f" ({d['fit']['level']:.0%} interval {d['fit']['b_crit_lo']:.3g} to "
                f"{d['fit']['b_crit_hi']:.3g}, from the fit's covariance)"
                if d["fit"].get("b_crit_lo") is not None
                else ""
            )
            if bc
            else "No fit of S = S_min (1 + B_crit/B) (McCandlish et al. 2018, eq. 2.11), so no "
            f"empirical critical batch: {d['fit_note']}"
        )
        + (f"; the gradient noise scale estimates {est['value']:.3g}." if est else "."),
        "",
        "The LR of each rung follows the study's rule (not tuned per batch as in Shallue et al.), "
        "and the schedule's decay is tied to the step budget: read steps-to-target with that in "
        "mind.",
    ]
    return "\n".join(lines).strip()


# ---------------------------------------------------------------- stability probe


def section_probe(study: Study, ctx: ReportContext) -> Section:
    """Whether x is real: constant-LR probes at multiples of x, and Lightning's lr_find beside it."""
    assert study.selection is not None
    return probe_section(study.selection, ctx)


def probe_section(sel: Selection, ctx: ReportContext) -> Section:
    """The selection's stability probe (the newest of this configuration; a note when it
    tested another x than the compared runs used)."""
    key, title = "stability_probe", "Is x real? (stability probe)"
    rec = sel.probe
    if rec is None:
        return Section(
            key,
            title,
            "No stability probe in this study: `python -m batchsize_study "
            "experiment=stability_probe` (after superconvergence) runs it.",
            {},
        )
    data = {k: v for k, v in rec.items() if k != "_path"}
    data["note"] = sel.probe_note
    x = rec["unstable_lr"]
    lines = [f"**Note: {sel.probe_note}**", ""] if sel.probe_note else []
    lines += [
        rec["message"] + ".",
        "",
        f"Constant-LR runs of {rec['probe']['steps']} steps ({rec['probe']['warmup']} warmup) at "
        f"batch {rec['batch_size']}, seed {rec['seed']}. *Stops improving*: "
        f"{rec['stops_improving_definition']}.",
        "",
        "| multiple of x | lr | final loss ± se | plain L >= L(lower) | status | stops improving "
        "| beyond boundary |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in rec["probes"]:
        fl, se = p["final_loss"], p.get("final_loss_se") or 0.0
        lines.append(
            f"| {p['multiple']:g} | {p['lr']:.4g} "
            f"| {'non-finite' if fl is None else f'{fl:.4f} ± {se:.3f}'} "
            f"| {'yes' if p.get('worse_than_lower') else 'no'} | {p['status']} "
            f"| {'yes: ' + p['reason'] if p['stops_improving'] else 'no'} "
            f"| {'yes' if p.get('beyond_boundary') else 'no'} |"
        )
    sug = rec.get("lr_find_suggestion")
    lines += [
        "",
        f"| reading | lr | / x |\n|---|---|---|\n| x (superconvergence onset) | {x:.4g} | 1 |",
    ]
    if rec.get("boundary_lr"):
        lines.append(
            f"| probe boundary ({rec['boundary']}) | {rec['boundary_lr']:.4g} | "
            f"{rec['boundary_lr'] / x:.3g} |"
        )
    best = rec.get("short_horizon_best_lr")
    if best:
        lines.append(
            f"| lowest final loss in {rec['probe']['steps']} steps (short-horizon optimum) | "
            f"{best:.4g} | {best / x:.3g} |"
        )
    if sug:
        lines.append(f"| Lightning `Tuner.lr_find` suggestion | {sug:.4g} | {sug / x:.3g} |")
    lines.append("")
    lines.append(
        "lr_find suggests the LR of the steepest loss descent in a short exponential sweep, "
        "typically well below the stability limit; x and the probe boundary measure the limit."
    )
    if best:
        edge = (
            "The optimum sits at the lowest multiple probed, so it may lie below the grid: "
            "`y_from=probe` refuses it until the probe runs lower `probe.multiples`. "
            if optimum_at_lowest_multiple(rec)
            else ""
        )
        lines.append(
            f"{edge}`experiment=small_batch y_from=probe` trains y at the short-horizon optimum "
            f"({best / x:.3g}·x instead of the rule's lr_factor·x, 0.5·x by default); at both "
            "model sizes checked it matched the full-length sweeps' best within their factor-2 "
            "grid (docs/lr_sweep.md)."
        )
    # each probe's metrics.csv next to its result.json (a moved study still reads)
    probe_runs = {run_name(r): r for r in sel.records if r.get("experiment") == STABILITY_PROBE}
    losses = {}
    for p in rec["probes"]:
        r = probe_runs.get(str(p.get("run_id")))
        if r is not None:
            losses[p["multiple"]] = read_metrics(beside(r, METRICS)).train_loss.tolist()
    name = ctx.save(figures.stability_probe(rec, losses), "stability_probe.png")
    lines.append(f"\n![stability_probe]({name})")
    return Section(key, title, "\n".join(lines).strip(), data, [name])


SECTIONS: tuple[SectionFn, ...] = (
    section_verdict,
    sweeps.tuned_section,
    section_runs,
    evaluate_section,
    section_curves,
    section_schedules,
    sweeps.sensitivity_section,
    sweeps.superconvergence_section,
    section_diagnostics,
    section_ladder,
    section_probe,
)
"""Every report's sections, in order. Add one by appending it here."""
