"""Batch-size ladder: the Shallue/McCandlish readings on synthetic numbers, and a smoke ladder."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from batchsize_study.config import CompareConfig
from batchsize_study.experiments import run
from batchsize_study.ladder import (
    analyse_ladder,
    critical_batch_verdict,
    fit_critical_batch,
    regime,
    steps_to_target,
)
from batchsize_study.report.load import load_ladder
from batchsize_study.report.sections import ReportContext, ladder_markdown, ladder_section
from batchsize_study.study import select, select_records


def test_fit_recovers_critical_batch():
    # S = S_min (1 + B_crit / B) with S_min = 100, B_crit = 64 (McCandlish et al. 2018, eq. 2.11).
    bs = [8, 16, 32, 64, 128, 256]
    steps = [100 * (1 + 64 / b) for b in bs]
    fit = fit_critical_batch(bs, steps)
    assert fit is not None
    assert fit["s_min"] == pytest.approx(100)
    assert fit["b_crit"] == pytest.approx(64)
    assert fit_critical_batch([8], [10]) is None  # one batch size: no fit
    assert fit_critical_batch([8, 16, 32], [10, 20, 30]) is None  # more steps at larger batch


def test_regimes_follow_shallue():
    assert regime(8, 200, 16, 100)[1] == "perfect scaling"
    assert regime(8, 200, 16, 150)[1] == "diminishing returns"
    assert regime(8, 200, 16, 195)[1] == "maximal data parallelism"
    assert regime(8, 200, 16, 100)[0] == pytest.approx(1.0)


def test_target_and_verdict():
    assert steps_to_target([1, 2, 3], [3.0, 2.0, 1.0], 2.0) == 2
    assert steps_to_target([1, 2, 3], [3.0, 2.5, 2.1], 2.0) is None
    assert critical_batch_verdict(16, 100) == "below"
    assert critical_batch_verdict(64, 100) == "near"
    assert critical_batch_verdict(512, 100) == "above"
    assert critical_batch_verdict(64, None) == "unknown"


def test_smoke_ladder_of_three_batch_sizes_gives_both_plots(cfg_factory, tmp_path: Path):
    study = tmp_path / "study"
    common = ("max_steps=16", "warmup_steps=4", "val_every_steps=16", "micro_batch_size=8")
    run(cfg_factory("experiment=small_batch", "batch_size=8", "lr=0.01", *common))
    for b in (16, 32):
        rec = run(cfg_factory("experiment=large_batch", f"batch_size={b}", *common))
        assert rec["status"] == "completed"
    out = tmp_path / "report"
    out.mkdir()
    sec = ladder_section(select(study), ReportContext(out, CompareConfig()))
    md, data, pngs = sec.markdown, sec.data, [out / p for p in sec.plots]
    assert [r["batch_size"] for r in data["rungs"]] == [8, 16, 32]
    assert sorted(Path(p).name for p in pngs) == [
        "ladder_loss_at_step.png",
        "ladder_steps_to_target.png",
    ]
    for p in pngs:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 32 |" in md and "steps to target" in md
    json.dumps(data)  # json-able
    worst = max(r["final_smoothed_loss"] for r in data["rungs"])
    assert data["target_loss"] == pytest.approx(worst)
    assert all(r["steps_to_target"] is not None for r in data["rungs"])
    assert data["gradient_noise_scale"] is None or data["gradient_noise_scale"] > 0
    assert all(math.isfinite(r["loss_at_step"]["16"]) for r in data["rungs"])


def test_ladder_section_without_runs(tmp_path: Path):
    assert load_ladder(select_records([], tmp_path))["rungs"] == []
    sec = ladder_section(select(tmp_path), ReportContext(tmp_path, CompareConfig()))
    assert sec.plots == [] and "No ladder" in sec.markdown and sec.data["rungs"] == []


def _rung(b: int, steps_to: int) -> dict:
    """A rung whose smoothed loss reaches 1.0 at ``steps_to`` of 40 steps."""
    return {
        "batch_size": b,
        "runs": [f"r{b}"],
        "experiments": ["large_batch"],
        "lr": 0.01,
        "steps": list(range(1, 41)),
        "smoothed_loss": [2.0 if s < steps_to else 1.0 for s in range(1, 41)],
        "final_val_loss": None,
        "gradient_noise_scale": None,
    }


def test_two_rungs_give_no_critical_batch():
    """Two batch sizes determine S_min and B_crit exactly (no check of the model): no fit."""
    assert fit_critical_batch([8, 16], [200, 120]) is None
    assert fit_critical_batch([8, 16, 16], [200, 120, 121]) is None  # still two batch sizes
    assert fit_critical_batch([8, 16, 32], [200, 120, 80]) is not None
    d = analyse_ladder([_rung(8, 30), _rung(16, 20)], ("k", 40), target=1.0)
    assert d["fit"] is None and d["empirical_critical_batch"] is None
    assert "at least 3 batch sizes" in d["fit_note"]
    md = ladder_markdown(d)
    assert (
        "B_crit =" not in md
        and "no empirical critical batch: it needs at least 3 batch sizes" in md
    )
    d3 = analyse_ladder([_rung(8, 30), _rung(16, 20), _rung(32, 16)], ("k", 40), target=1.0)
    assert d3["fit"] is not None and "B_crit =" in ladder_markdown(d3)


def _ladder_study(tmp_path: Path, noise: dict[tuple[int, int], tuple[float, list | None]]) -> list:
    """Records + metrics.csv of rungs (batch, seed) -> (B_simple, its per-run interval)."""
    from batchsize_study.metrics import CSV_FIELDS

    recs = []
    for (b, seed), (gns, interval) in noise.items():
        rdir = tmp_path / "runs" / f"large_batch-bs{b}-seed{seed}"
        rdir.mkdir(parents=True)
        with open(rdir / "metrics.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            w.writeheader()
            for s in range(1, 21):
                w.writerow({"step": s, "tokens": s * b, "lr": 0.01, "train_loss": 5 - s / b})
        rec = {
            "experiment": "large_batch",
            "status": "completed",
            "run_id": rdir.name,
            "batch_size": b,
            "seed": seed,
            "lr": 0.01,
            "max_steps": 20,
            "compat_key": "k",
            "gradient_noise_scale": gns,
            "noise": {"b_simple_interval": interval, "interval_method": "synthetic"}
            if interval
            else {},
            "_path": str(rdir / "result.json"),
        }
        recs.append(rec)
    return recs


def test_noise_scale_regime_only_when_the_interval_supports_it(tmp_path: Path):
    """Seeds 0 and 1 measure B_simple 1,261 and 132 (tenfold apart, as on the default study):
    no regime conclusion from their median."""
    recs = _ladder_study(tmp_path, {(64, 0): (1261.0, None), (64, 1): (132.0, None)})
    d = load_ladder(select_records(recs, tmp_path))
    est = d["noise_scale"]
    assert est["n_seeds"] == 2 and est["interval"][0] < 64 / 2 and est["interval"][1] > 2 * 64
    assert d["rungs"][0]["noise_regime"] == "uncertain"
    md = ladder_markdown(d)
    assert "too uncertain" in md and "**below**" not in md


def test_noise_scale_regime_with_a_tight_interval(tmp_path: Path):
    seeds = {(16, s): (v, None) for s, v in enumerate((500.0, 520.0, 510.0))}
    seeds |= {(4096, s): (v, None) for s, v in enumerate((505.0, 515.0, 512.0))}
    d = load_ladder(select_records(_ladder_study(tmp_path, seeds), tmp_path))
    lo, hi = d["noise_scale"]["interval"]
    assert 450 < lo < 510 < hi < 560
    assert [r["noise_regime"] for r in d["rungs"]] == ["below", "above"]
    assert "is **below** the noise scale" in ladder_markdown(d)


def test_one_seed_uses_the_recorded_interval(tmp_path: Path):
    d = load_ladder(
        select_records(_ladder_study(tmp_path, {(16, 0): (500.0, [400.0, 600.0])}), tmp_path)
    )
    assert d["noise_scale"]["interval"] == [400.0, 600.0]
    assert d["noise_scale"]["method"].startswith("the run's own interval")
    assert d["rungs"][0]["noise_regime"] == "below"
    d = load_ladder(
        select_records(_ladder_study(tmp_path / "b", {(16, 0): (500.0, None)}), tmp_path)
    )
    assert d["noise_scale"]["interval"] is None and d["rungs"][0]["noise_regime"] == "uncertain"
    assert "too uncertain" in ladder_markdown(d)


def test_one_seed_noise_scale_pairs_the_interval_with_its_own_estimate():
    """The recorded jackknife interval is the whole-run estimate's; the final EMA (later in
    training, where B_simple has grown) may lie outside it, so it is not the value shown."""
    from batchsize_study.ladder import noise_scale_estimate

    rec = {
        "seed": 0,
        "gradient_noise_scale": 200.0,  # final EMA
        "noise": {
            "run_mean": {"b_simple": 40.0},
            "b_simple_interval": [20.0, 80.0],
            "interval_of": "run_mean",
            "interval_method": "jackknife",
        },
    }
    est = noise_scale_estimate([rec], 0.95)
    assert est is not None and est["value"] == 40.0 and est["interval"] == [20.0, 80.0]
    assert est["interval"][0] <= est["value"] <= est["interval"][1]
