"""experiment=compare: statistics, verdicts on synthetic studies with known answers, the smoke
study end to end, and the one-line errors."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_utils import assert_fresh_interpreter_runs
from conftest import REPO, make_cfg

from batchsize_study import report, stats
from batchsize_study.errors import ConfigError, UserError
from batchsize_study.experiments import run
from batchsize_study.recorder import CSV_FIELDS
from batchsize_study.report import figures, sections
from batchsize_study.study import write_json_atomic

SEQ = 8


def write_run(
    sdir: Path,
    experiment: str,
    batch: int,
    seed: int,
    train: np.ndarray,
    val: dict[int, float] | None = None,
    lr: float = 0.01,
    status: str = "completed",
    **extra: object,
) -> Path:
    """A run folder as train() writes it: result.json + metrics.csv, with a given loss curve."""
    rid = f"{experiment}-bs{batch}-seed{seed}-synthetic"
    rdir = sdir / "runs" / rid
    rdir.mkdir(parents=True)
    tps = batch * SEQ
    with open(rdir / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for i, loss in enumerate(train, start=1):
            w.writerow({"step": i, "tokens": i * tps, "lr": lr, "train_loss": loss})
            if val and i in val:
                w.writerow({"step": i, "tokens": i * tps, "val_loss": val[i]})
    rec = {
        "experiment": experiment,
        "status": status,
        "run_id": rid,
        "seed": seed,
        "batch_size": batch,
        "micro_batch_size": min(batch, 8),
        "devices": 1,
        "accumulate_grad_batches": max(1, batch // 8),
        "seq_len": SEQ,
        "tokens_per_step": tps,
        "max_steps": len(train),
        "lr": lr,
        "lr_source": "given: lr on the command line/config",
        "steps_done": len(train),
        "tokens_seen": len(train) * tps,
        "final_train_loss": float(np.mean(train[-10:])),
        "final_val_loss": val[max(val)] if val else None,
        "compat_key": "k",
        "finished_at": 1.0 + seed,
        "derivation": {"small_batch_size": 8} if experiment == "large_batch" else {},
        **extra,
    }
    write_json_atomic(rdir / "result.json", rec)
    return rdir


def curve(steps: int, offset: float = 0.0, scale: float = 1.0, noise: float = 0.0, seed: int = 0):
    """A falling loss 3 + 2/sqrt(step/scale) + offset, with optional Gaussian noise."""
    s = np.arange(1, steps + 1, dtype=float)
    rng = np.random.default_rng(seed)
    return 3.0 + 2.0 / np.sqrt(s * scale) + offset + noise * rng.standard_normal(steps)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)]
)
def test_t_quantile_matches_the_table(df: int, expected: float) -> None:
    assert stats.t_quantile(0.95, df) == pytest.approx(expected, abs=2e-3)


def test_ema_is_bias_corrected_and_skips_nonfinite() -> None:
    out = stats.ema(np.array([2.0, 2.0, math.nan, 2.0]), 0.9)
    assert out == pytest.approx([2.0, 2.0, 2.0, 2.0])
    assert stats.ema(np.array([1.0, 3.0]), 0.0) == pytest.approx([1.0, 3.0])


def test_paired_test_separates_effect_from_spread() -> None:
    clear = stats.paired_test([-0.10, -0.11, -0.09], 0.95)
    noise = stats.paired_test([-0.10, 0.12, 0.01], 0.95)
    assert clear is not None and noise is not None
    assert clear["significant"] and clear["interval"][1] < 0
    assert not noise["significant"] and noise["interval"][0] < 0 < noise["interval"][1]
    assert stats.paired_test([-0.1], 0.95) is None


# ---------------------------------------------------------------- verdicts (synthetic)


def test_three_seeds_large_batch_lower_per_step_but_not_per_token(tmp_path: Path) -> None:
    """Large batch 32 is 0.1 lower than batch 8 at every step (seed noise 0.005), but per token
    it has seen 4x more data for each step, so at equal tokens the small batch is ahead."""
    for seed in range(3):
        val_s = {20: 3.6, 40: 3.5}
        write_run(tmp_path, "small_batch", 8, seed, curve(40, noise=0.005, seed=seed), val_s)
        val_l = {k: v - 0.1 + 0.003 * seed for k, v in val_s.items()}
        large = curve(40, offset=-0.1, noise=0.005, seed=10 + seed)
        write_run(tmp_path, "large_batch", 32, seed, large, val_l, lr=0.02)
    comp = report.build_report(tmp_path)
    v = comp["verdict"]["comparisons"][0]
    assert v["per_step_verdict"] == "supported"
    fs = v["per_step"]["final"]
    assert fs["metric"] == "val_loss" and fs["at"] == 40
    assert fs["difference"] == pytest.approx(-0.097, abs=1e-3)
    assert fs["test"]["n_seeds"] == 3 and fs["test"]["significant"]
    assert v["per_step"]["fraction_lower"] > 0.9
    assert v["per_token_verdict"] == "not supported"
    assert v["per_token"]["final"]["large_lower"] is False
    assert comp["verdict"]["one_seed"] is False
    md = (tmp_path / "report" / "report.md").read_text()
    assert "larger than the seed-to-seed spread" in md and "3 paired seeds" in md
    # per-step interval across seeds is a band, not a line
    c = comp["curves"]["large batch 32"]["per_step"]
    assert all(lo < m < hi for lo, m, hi in zip(c["lo"][5:], c["mean"][5:], c["hi"][5:]))


def test_difference_within_seed_spread_is_inconclusive(tmp_path: Path) -> None:
    for seed, off in enumerate((-0.05, 0.06, 0.0)):
        write_run(tmp_path, "small_batch", 8, seed, curve(30), {30: 3.5})
        write_run(tmp_path, "large_batch", 16, seed, curve(30, offset=off), {30: 3.5 + off})
    v = report.build_report(tmp_path)["verdict"]["comparisons"][0]
    assert v["per_step_verdict"] == "inconclusive"
    assert "is not larger than the seed-to-seed spread" in v["text"]


def test_one_seed_verdict_says_it_rests_on_one_seed(tmp_path: Path) -> None:
    write_run(tmp_path, "small_batch", 8, 0, curve(30), {30: 3.5})
    write_run(tmp_path, "large_batch", 16, 0, curve(30, offset=0.05), {30: 3.55})
    comp = report.build_report(tmp_path)
    v = comp["verdict"]["comparisons"][0]
    assert v["per_step_verdict"] == "not supported" and comp["verdict"]["one_seed"]
    assert "rests on one seed" in v["text"]


def test_ladder_of_large_batches_is_compared_each(tmp_path: Path) -> None:
    write_run(tmp_path, "small_batch", 8, 0, curve(30))
    for b, off in ((16, -0.02), (32, -0.04), (64, 0.03)):
        write_run(tmp_path, "large_batch", b, 0, curve(30, offset=off))
    comp = report.build_report(tmp_path)
    verdicts = {
        c["large_batch_size"]: c["per_step_verdict"] for c in comp["verdict"]["comparisons"]
    }
    assert verdicts == {16: "supported", 32: "supported", 64: "not supported"}
    assert comp["verdict"]["overall_per_step"] == "mixed"
    assert comp["verdict"]["comparisons"][0]["per_step"]["final"]["metric"] == "smoothed_train_loss"


def test_overfitting_is_told_apart_from_destabilisation(tmp_path: Path) -> None:
    falling = curve(40)
    rising = np.concatenate([curve(20), curve(20)[::-1] + 0.5])
    write_run(tmp_path, "small_batch", 8, 0, falling, {10: 3.9, 20: 3.7, 30: 3.8, 40: 3.95})
    write_run(tmp_path, "large_batch", 16, 0, rising, {10: 3.9, 20: 3.7, 30: 4.2, 40: 4.6})
    comp = report.build_report(tmp_path)
    flags = {d["run_id"].split("-")[0]: d["flag"] for d in comp["diagnostics"]}
    assert flags == {"small_batch": "overfitting", "large_batch": "destabilised"}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "overfitting** — validation loss rose" in md


# ---------------------------------------------------------------- the smoke study


def test_compare_on_the_smoke_study(smoke_study: Path) -> None:
    runs_before = {p: p.stat().st_mtime_ns for p in (smoke_study / "runs").rglob("*")}
    comp = run(make_cfg(smoke_study, "experiment=compare"))
    out = smoke_study / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {
        "loss_vs_step.png",
        "loss_vs_tokens.png",
        "lr_schedules.png",
        "superconvergence.png",
        "loss_difference.png",
    } <= set(pngs)
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["verdict"]["one_seed"] is True
    c = saved["verdict"]["comparisons"][0]
    assert c["small_batch_size"] == 16 and c["large_batch_size"] == 64
    assert c["per_token"]["axis"] == "tokens" and c["per_token"]["final"]["at"] == 40 * 16 * 32
    assert c["per_step"]["final"]["metric"] == "val_loss"
    assert {r["experiment"] for r in saved["runs"]} == {
        "superconvergence",
        "small_batch",
        "large_batch",
    }
    md = (out / "report.md").read_text()
    assert "rests on one seed" in md and "Per token seen" in md and "16 × 4 × 1" in md
    assert comp["verdict"]["comparisons"][0]["per_step_verdict"] in (
        "supported",
        "not supported",
    )
    assert {p: p.stat().st_mtime_ns for p in (smoke_study / "runs").rglob("*")} == runs_before


# ---------------------------------------------------------------- errors


def test_missing_or_empty_study_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no runs/ folder\); run `python -m batchsize_study -m"):
        run(make_cfg(tmp_path / "nowhere", "experiment=compare"))
    write_run(tmp_path, "superconvergence", 8, 0, curve(10), status="diverged")
    with pytest.raises(UserError, match="no completed small_batch or large_batch record") as ei:
        report.build_report(tmp_path)
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "report").exists()


def test_torn_record_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_run(tmp_path, "small_batch", 8, 0, curve(20))
    write_run(tmp_path, "large_batch", 16, 0, curve(20))
    torn = tmp_path / "runs" / "torn"
    torn.mkdir()
    (torn / "result.json").write_text('{"experiment": "large_ba')
    with caplog.at_level(logging.WARNING):
        comp = report.build_report(tmp_path)
    assert "skipping unreadable record" in caplog.text
    assert len(comp["runs"]) == 2


def test_unknown_compare_key_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"compare.smoothnes='x': unknown key; use one of confidence, dpi"
    ):
        run(make_cfg(tmp_path, "experiment=compare", "+compare.smoothnes=x"))


def test_a_section_is_one_function(tmp_path: Path) -> None:
    write_run(tmp_path, "small_batch", 8, 0, curve(20))
    write_run(tmp_path, "large_batch", 16, 0, curve(20))

    def section_extra(study: report.Study, ctx: report.ReportContext) -> report.Section:
        n = len(study.large)
        return report.Section("extra", "Extra", f"{n} large group(s)", {"n": n})

    i = report.SECTIONS.index(sections.section_runs)
    order = (*report.SECTIONS[:i], section_extra, *report.SECTIONS[i:])
    comp = report.build_report(tmp_path, sections=order)
    assert comp["extra"] == {"n": 1}
    assert comp["sections"].index("extra") == comp["sections"].index("runs") - 1
    assert "## Extra\n\n1 large group(s)" in (tmp_path / "report" / "report.md").read_text()
    assert "extra" not in report.build_report(tmp_path)["sections"]  # nothing global changed


def test_a_section_of_ones_own_joins_the_report(tmp_path: Path) -> None:
    """Every section has one signature, ``(study, ctx) -> Section``: a user's own joins the
    list, writes its figure through ctx.save (compare.dpi) and lands in comparison.json."""
    write_run(tmp_path, "small_batch", 8, 0, curve(20))
    write_run(tmp_path, "large_batch", 16, 0, curve(20))

    def mine(study: report.Study, ctx: report.ReportContext) -> report.Section:
        fig, ax = figures.new_figure()
        ax.plot([0, 1], [0, 1])
        name = ctx.save(fig, "mine.png")
        return report.Section("mine", "Mine", f"runs: {len(study.runs)}", {"n": 2}, [name])

    comp = report.build_report(tmp_path, sections=(*report.SECTIONS, mine))
    assert comp["mine"] == {"n": 2} and "mine.png" in comp["plots"]
    assert "## Mine\n\nruns: 2\n" in (tmp_path / "report" / "report.md").read_text()


def test_the_report_imports_no_training() -> None:
    """Arrows point one way: the report (and the pure analysis it reads) never imports the
    training or experiment layer, lazily or not (issue 10)."""
    import ast

    pkg = REPO / "batchsize_study"
    files = [*sorted((pkg / "report").glob("*.py")), pkg / "ladder.py", pkg / "probe_analysis.py"]
    banned = {"experiments", "training", "runtime", "record", "recorder", "model", "data", "probe"}
    banned |= {"checkpointing", "noise", "spike", "callbacks", "lightning", "torch"}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                top = parts[1] if parts[0] == "batchsize_study" and len(parts) > 1 else parts[0]
                assert top not in banned, f"{f.name} imports {name}"
    code = (
        "import sys, batchsize_study.report; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'torch') or "
        "m.split('.')[:2] in (['batchsize_study', b] for b in "
        "('experiments', 'training', 'recorder', 'model', 'data', 'probe'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert_fresh_interpreter_runs(code)


@pytest.mark.slow
def test_cli_multirun_with_compare_last(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "batchsize_study",
        "-m",
        "debug=smoke",
        f"study.dir={tmp_path}",
        "logger=csv",
        "experiment=superconvergence,small_batch,large_batch,compare",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "report" / "report.md").exists()
    assert len(list((tmp_path / "report").glob("*.png"))) >= 4


def test_groups_without_a_common_seed_get_a_welch_test(tmp_path: Path) -> None:
    """Unpaired seed groups: an unpaired (Welch) test, not a verdict from the sign alone."""
    for seed in (0, 1, 2):
        write_run(tmp_path, "small_batch", 8, seed, curve(20, noise=0.01, seed=seed))
        large = curve(20, offset=-0.1, noise=0.01, seed=20 + seed)
        write_run(tmp_path, "large_batch", 16, seed + 5, large)
    v = report.build_report(tmp_path)["verdict"]["comparisons"][0]
    test = v["per_step"]["final"]["test"]
    assert v["per_step"]["unpaired"] and test["kind"] == "welch" and test["significant"]
    assert test["n_small"] == 3 and test["n_large"] == 3 and test["interval"][1] < 0
    assert v["per_step_verdict"] == "supported"
    assert "share no seed" in v["text"] and "Welch" in v["text"]


def test_unpaired_single_seeds_are_untested(tmp_path: Path) -> None:
    """One seed each, different seeds: no pairing and no spread; the sign alone is no verdict."""
    write_run(tmp_path, "small_batch", 8, 0, curve(20), {20: 3.5})
    write_run(tmp_path, "large_batch", 16, 5, curve(20, offset=-0.1), {20: 3.4})
    v = report.build_report(tmp_path)["verdict"]["comparisons"][0]
    assert v["per_step_verdict"] == "untested" and v["per_token_verdict"] == "untested"
    assert v["per_step"]["final"]["test"] is None
    assert "untested" in v["text"] and "share no seed" in v["text"]


def test_identical_per_seed_differences_give_no_verdict(tmp_path: Path) -> None:
    """se = 0: the paired test is undefined (not p = 0) and the report draws no verdict from it."""
    for seed in range(3):
        write_run(tmp_path, "small_batch", 8, seed, curve(30), {30: 3.5})
        write_run(tmp_path, "large_batch", 16, seed, curve(30, offset=-0.1), {30: 3.4})
    comp = report.build_report(tmp_path)
    v = comp["verdict"]["comparisons"][0]
    test = v["per_step"]["final"]["test"]
    assert test["p_value"] is None and test["undefined"]
    assert v["per_step_verdict"] == "untested"
    assert "undefined" in v["text"] and "no verdict" in v["text"]
    assert "p = 0" not in (tmp_path / "report" / "report.md").read_text()


def test_per_token_curves_are_smoothed_over_the_same_tokens(tmp_path: Path) -> None:
    """Two runs with the same loss as a function of tokens (batch 8 and 32, 4x the tokens per
    step) must match per token. An EMA per step spans 4x more tokens for the large batch, so
    on a falling curve it lags behind and reads ~0.05 nats high at the end."""
    loss = lambda tokens: 3.0 + 2.0 * np.exp(-tokens / 3000.0)  # noqa: E731
    write_run(tmp_path, "small_batch", 8, 0, loss(np.arange(1, 201) * 8 * SEQ))
    write_run(tmp_path, "large_batch", 32, 0, loss(np.arange(1, 51) * 32 * SEQ))
    comp = report.build_report(tmp_path)
    v = comp["verdict"]["comparisons"][0]
    assert v["per_token"]["final"]["metric"] == "smoothed_train_loss"
    assert abs(v["per_token"]["final"]["difference"]) < 0.003
    # from 6,400 tokens on (per-step smoothing: 0.21 nats apart there)
    late = np.array(v["curves"]["per_token"]["difference_mean"])[100:]
    assert np.max(np.abs(late)) < 0.015
    assert "per token" in comp["verdict"]["metric_note"]


@pytest.mark.parametrize(("se", "exceeds"), [(0.02, False), (0.002, True)])
def test_validation_standard_error_is_shown_and_judged(
    tmp_path: Path, se: float, exceeds: bool
) -> None:
    """Records may carry final_val_loss_se (the SE of the mean loss over validation windows):
    the runs table shows it and the verdict says whether the final difference exceeds it."""
    write_run(tmp_path, "small_batch", 8, 0, curve(30), {30: 3.50}, final_val_loss_se=se)
    write_run(tmp_path, "large_batch", 16, 0, curve(30), {30: 3.48}, final_val_loss_se=se)
    comp = report.build_report(tmp_path)
    final = comp["verdict"]["comparisons"][0]["per_step"]["final"]
    assert final["metric"] == "val_loss"
    assert final["val_se"]["difference"] == pytest.approx(math.sqrt(2) * se)
    assert final["val_se"]["exceeds"] is exceeds
    text = comp["verdict"]["comparisons"][0]["text"]
    assert ("exceeds" if exceeds else "does not exceed") + " the validation set's noise" in text
    assert {r["final_val_loss_se"] for r in comp["runs"]} == {se}
    assert f"3.5000 ± {se:.4f}" in (tmp_path / "report" / "report.md").read_text()


def test_records_without_a_validation_se_still_report(tmp_path: Path) -> None:
    write_run(tmp_path, "small_batch", 8, 0, curve(30), {30: 3.50})
    write_run(tmp_path, "large_batch", 16, 0, curve(30), {30: 3.48})
    comp = report.build_report(tmp_path)
    assert comp["verdict"]["comparisons"][0]["per_step"]["final"]["val_se"] is None
    assert "validation set's noise" not in comp["verdict"]["comparisons"][0]["text"]
