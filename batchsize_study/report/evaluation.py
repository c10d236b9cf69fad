"""The test-set evaluation's report section (experiment=evaluate writes the record and the
per-window losses; this reads them). numpy and matplotlib only: the report loads no torch."""

from __future__ import annotations

from typing import Any

import numpy as np

from batchsize_study.report.context import ReportContext, Section
from batchsize_study.report.figures import new_figure
from batchsize_study.report.load import Study
from batchsize_study.stats import fmt, t_quantile
from batchsize_study.study import EVALUATION_LOSSES as LOSSES_FILE
from batchsize_study.study import Selection, beside


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text`` (generated code may hold fences)."""
    run = cur = 0
    for ch in text:
        cur = cur + 1 if ch == "`" else 0
        run = max(run, cur)
    return "`" * max(3, run + 1)


def _losses_of(rec: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """Per-window losses of an evaluate record: the file beside it in the study folder (never
    the recorded absolute path, which may be another copy of the study)."""
    p = beside(rec, LOSSES_FILE)
    if p.is_file():
        with np.load(p) as z:
            return {str(n): z["losses"][i] for i, n in enumerate(z["run_ids"])}
    return None


def evaluate_figure(rec: dict[str, Any], losses: dict[str, np.ndarray] | None) -> Any:
    """Left: each model's test loss with its interval; right: the per-window differences large
    minus small (pooled over seeds) with the bootstrap interval of their mean."""
    fig, (ax_l, ax_r) = new_figure(10.0, 4.2, ncols=2)
    level = rec["evaluate"]["confidence"]
    z = t_quantile(level, 10**6)
    rows = rec["models"]
    colors = {"small_batch": "#1f77b4", "large_batch": "#d62728"}
    for i, r in enumerate(rows):
        ax_l.errorbar(
            i,
            r["test_loss"],
            yerr=z * (r["test_loss_se"] or 0.0),
            fmt="o",
            color=colors.get(r["experiment"], "#555555"),
            capsize=4,
        )
    ax_l.set_xticks(range(len(rows)), [f"bs{r['batch_size']}\nseed {r['seed']}" for r in rows])
    ax_l.set_xlim(-0.5, len(rows) - 0.5)
    ax_l.set_ylabel("test loss (nats per token)")
    ax_l.set_title(f"Test loss, {level:.0%} interval (±{z:.2f} SE)")
    ax_l.grid(True, alpha=0.3)
    for cmp in rec["comparisons"]:
        if losses is None or any(n not in losses for n in cmp["small_runs"] + cmp["large_runs"]):
            break
        diff = np.mean([losses[n] for n in cmp["large_runs"]], axis=0) - np.mean(
            [losses[n] for n in cmp["small_runs"]], axis=0
        )
        ax_r.hist(diff, bins=40, color="#999999", alpha=0.7)
        lo, hi = cmp["interval"]
        ax_r.axvspan(lo, hi, color=colors["large_batch"], alpha=0.3, label=f"{level:.0%} interval")
        ax_r.axvline(cmp["mean_difference"], color=colors["large_batch"], label="mean")
        ax_r.axvline(0.0, color="black", lw=0.8, ls="--")
        ax_r.set_title(
            f"Per-window loss, bs{cmp['large_batch_size']} minus bs{cmp['small_batch_size']}"
        )
        break
    ax_r.set_xlabel("loss difference (nats per token)")
    ax_r.set_ylabel("test windows")
    ax_r.grid(True, alpha=0.3)
    if ax_r.get_legend_handles_labels()[0]:
        ax_r.legend()
    return fig


def evaluate_section(study: Study, ctx: ReportContext) -> Section:
    """The saved models on the held-out test split (experiment=evaluate), when it has run."""
    assert study.selection is not None
    return evaluation_section(study.selection, ctx)


def evaluation_section(sel: Selection, ctx: ReportContext) -> Section:
    """The selection's test-set evaluation: of the compared runs, or saying of which others."""
    key, title = "evaluation", "The saved models on the test split"
    rec = sel.evaluation
    lines: list[str] = []
    if rec is None:
        return Section(
            key,
            title,
            "No test-set evaluation in this study: `python -m batchsize_study experiment=evaluate` "
            "(after large_batch) scores the saved models on the held-out test split.",
            {},
        )
    if sel.evaluation_note:
        lines += [f"**Note: {sel.evaluation_note}**", ""]
    data = {k: v for k, v in rec.items() if k != "_path"}
    data["of_compared_runs"] = sel.evaluation_note is None
    data["note"] = sel.evaluation_note
    ts = rec["test_split"]
    level = rec["evaluate"]["confidence"]
    if rec.get("warning"):
        lines += [f"**Warning: {rec['warning']}.**", ""]
    lines += [
        f"Test split: {ts['windows']:,} windows of {ts['seq_len']} tokens ({ts['tokens_scored']:,} "
        f"tokens scored; the split holds {ts['split_tokens']:,} tokens from {ts['split_documents']} "
        f"documents that training and validation never read). Largest standard error of a model's "
        f"mean test loss: {fmt(rec['max_test_loss_se'])} nats (target below {rec['se_target']}). "
        f"Precision {rec['precision']}.",
        "",
    ]
    for cmp in rec["comparisons"]:
        lines.append(f"- **{cmp['text']}**.")
        pooled = cmp["pooled"]
        w, b = pooled["windows"], pooled.get("blocks")
        extra = f"per window [{w['low']:+.4f}, {w['high']:+.4f}] (se {w['se']:.4f})"
        if b:
            extra += (
                f", per block of {b['block_windows']} windows [{b['low']:+.4f}, {b['high']:+.4f}]"
            )
        lines.append(f"  Intervals: {extra}; the verdict uses the wider.")
        t = cmp.get("across_seeds")
        if t and t.get("interval"):
            lines.append(
                f"  Across {t['n_seeds']} seeds (paired t): mean {t['mean_difference']:+.4f}, "
                f"{level:.0%} interval [{t['interval'][0]:+.4f}, {t['interval'][1]:+.4f}], "
                f"p = {t['p_value']:.3g}."
            )
    lines += [
        "",
        "| run | batch | seed | peak lr | final val loss | test loss ± se | test ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rec["models"]:
        lines.append(
            f"| {r['run_id']} | {r['batch_size']} | {r['seed']} | {fmt(r['lr'], '.4g')} | "
            f"{fmt(r['final_val_loss'])} | {fmt(r['test_loss'])} ± {fmt(r['test_loss_se'])} | "
            f"{fmt(r['test_ppl'], '.2f')} |"
        )
    if rec.get("not_evaluated"):
        lines += ["", "Not evaluated: " + "; ".join(rec["not_evaluated"]) + "."]
    png = ctx.save(evaluate_figure(rec, _losses_of(rec)), "evaluate_test_loss.png")
    lines += ["", f"![test loss]({png})", ""]
    s = rec["evaluate"]
    how = "greedy" if not s["temperature"] else f"sampled at temperature {s['temperature']}"
    samples = [r for r in rec["models"] if r.get("samples")]
    if samples:
        lines += [
            f"Generated samples ({how}, {s['sample_tokens']} tokens after a {s['prompt_tokens']}-token "
            "prompt from the test split; the prompt is shown before the `⟶` marker):",
            "",
        ]
        for r in samples:
            lines.append(f"*{r['experiment']}, batch {r['batch_size']}, seed {r['seed']}:*")
            lines.append("")
            for smp in r["samples"]:
                text = f"{smp['prompt']}⟶{smp['continuation']}"
                fence = _fence(text)
                lines += [fence, text, fence, ""]
    return Section(key, title, "\n".join(lines).strip(), data, [png])
