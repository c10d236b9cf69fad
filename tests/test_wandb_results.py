"""The study's results in wandb (batchsize_study.wandb_results): compare, evaluate and the lr_sweep
summary each log one run in the study's group, with their numbers as summary keys; compare run
again updates the same wandb run id; csv-only logging logs nothing; a wandb failure warns and
never fails the result; no wandb process is left behind."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_cfg
from test_wandb import read_offline_run, wandb_children

from batchsize_study.config import Config, validate
from batchsize_study.experiments import run
from batchsize_study.lr_sensitivity import summarise
from batchsize_study.wandb_results import (
    comparison_summary,
    curve_rows,
    log_lr_sweep,
    log_result_run,
    matched_step_rows,
)
from batchsize_study.wandb_utils import wandb_run_id

wandb = pytest.importorskip("wandb")


def _runs(sdir: Path) -> list[dict[str, Any]]:
    """Every offline run folder of the study, read, oldest first."""
    return [read_offline_run(f) for f in sorted((sdir / "wandb").glob("offline-run-*"))]


def _no_wandb_process_left() -> None:
    deadline = time.monotonic() + 15
    while wandb_children(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert wandb_children(os.getpid()) == []


def _config(sdir: Path, *overrides: str) -> Config:
    return validate(make_cfg(sdir, *overrides))


# ---------------------------------------------------------------- end to end (the smoke study)


@pytest.fixture
def study_copy(smoke_study: Path, tmp_path: Path) -> Path:
    """The session's smoke study copied, its records pointing at the copy's files."""
    dst = tmp_path / "study"
    shutil.copytree(smoke_study, dst, ignore=shutil.ignore_patterns("report", "hydra", "wandb"))
    for p in (dst / "runs").glob("*/result.json"):
        p.write_text(p.read_text().replace(str(smoke_study), str(dst)))
    return dst


def test_compare_logs_the_verdict_and_test_difference_to_one_wandb_run(study_copy: Path) -> None:
    """Acceptance (issue 20, item 2): after evaluate and compare with the wandb logger on, a run
    of the study's group holds the verdict and the test-set difference with its interval; compare
    again uses the same wandb run id; no wandb process is left."""
    sdir, wb = study_copy, ("logger=default", "study.name=wb_results")
    ev = run(make_cfg(sdir, "experiment=evaluate", "precision=32-true", "evaluate.samples=0", *wb))
    comp = run(make_cfg(sdir, "experiment=compare", *wb))
    run(make_cfg(sdir, "experiment=compare", *wb))
    _no_wandb_process_left()

    runs = _runs(sdir)
    by_job: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        assert r["group"] == "wb_results" and r["exit"] == 0, r["id"]
        by_job.setdefault(r["job_type"], []).append(r)
    assert sorted(by_job) == ["compare", "evaluate"]
    first, second = by_job["compare"]  # two processes, one wandb run
    assert first["id"] == second["id"] == wandb_run_id(sdir, "compare-wb_results")

    cmp = comp["evaluation"]["comparisons"][0]
    for r in (second, by_job["evaluate"][0]):
        s = r["summary"]
        assert s["test/difference"] == pytest.approx(cmp["mean_difference"])
        assert [s["test/interval_low"], s["test/interval_high"]] == pytest.approx(cmp["interval"])
        assert s["test/interval_from"] == cmp["interval_from"]
        assert s[f"test/bs{cmp['large_batch_size']}/difference"] == s["test/difference"]
    assert by_job["evaluate"][0]["name"] == ev["run_id"]

    s, v = second["summary"], comp["verdict"]
    assert s["verdict/per_step"] == v["overall_per_step"]
    assert s["verdict/per_token"] == v["overall_per_token"]
    c0 = v["comparisons"][0]
    bs = c0["large_batch_size"]
    assert s[f"verdict/bs{bs}/per_step"] == c0["per_step_verdict"]
    assert s[f"verdict/bs{bs}/step/final_difference"] == pytest.approx(
        c0["per_step"]["final"]["difference"]
    )
    marks = comp["schedules"]
    assert s["lr_x_unstable"] == pytest.approx(marks["x_unstable_lr"])
    assert s["lr_y_small"] == pytest.approx(marks["y_small_lr"])
    assert s[f"lr_z_large/bs{bs}"] == pytest.approx(marks["z_large_lr"][bs])
    assert s["noise/B_simple"] == pytest.approx(comp["ladder"]["noise_scale"]["value"])
    for png in comp["plots"]:  # every report figure, as an image
        assert s[f"figures/{Path(png).stem}/_type"] == "image-file", png
    assert s["tables/matched_steps/nrows"] == len(c0["matched_steps"])
    assert s["tables/difference_curves/nrows"] == len(curve_rows(v))


def test_csv_logger_and_disabled_mode_log_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = {"verdict/per_step": "supported"}
    csv = _config(tmp_path, "experiment=compare")  # conftest's default: logger=csv
    assert not csv.logger.wandb
    assert log_result_run(csv.logger, tmp_path, "g", "compare", "k", summary) is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    on = _config(tmp_path, "experiment=compare", "logger=default")
    assert log_result_run(on.logger, tmp_path, "g", "compare", "k", summary) is None
    assert not (tmp_path / "wandb").exists()


def test_a_wandb_failure_warns_and_never_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(tmp_path, "logger=default").logger

    def broken_media(_wandb: Any) -> dict[str, Any]:
        raise OSError("no such figure")

    with caplog.at_level(logging.WARNING, logger="batchsize_study"):
        assert log_result_run(cfg, tmp_path, "g", "compare", "k", {"a": 1}, broken_media) is None
    assert "could not log the compare results: no such figure" in caplog.text
    (r,) = _runs(tmp_path)  # the run was opened, then finished (not left open)
    assert r["exit"] == 0

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("wandb refused")

    monkeypatch.setattr(wandb, "init", refuse)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="batchsize_study"):
        assert log_result_run(cfg, tmp_path, "g", "evaluate", "k2", {"a": 1}) is None
    assert "wandb could not start" in caplog.text
    _no_wandb_process_left()


def test_lr_sweep_summary_is_a_wandb_run_with_best_lr_and_cliff(tmp_path: Path) -> None:
    lrs = [2.0**k for k in range(-10, -5)]
    points = [
        {
            "lr": lr,
            "seed": 0,
            "final_loss": v,
            "train_se": 0.01,
            "loss_kind": "val",
            "run_id": f"p{i}",
        }
        for i, (lr, v) in enumerate(zip(lrs, [5.6, 5.3, 5.2, 5.21, 6.0]))
    ]
    result = summarise(points, 2.0)
    record = {"run_id": "lr_sweep-summary-bs16-seed0-abc", "batch_size": 16, "seeds": [0]}
    record |= {"points": points, "unstable_lr": lrs[-1], **result, "sweep": {"snap": True}}
    record["cliff_over_x"] = result["cliff_lr"] / lrs[-1]
    c = _config(tmp_path, "experiment=lr_sweep", "logger=default", "study.name=sw")
    wid = log_lr_sweep(c, record, str(tmp_path))
    _no_wandb_process_left()
    (r,) = _runs(tmp_path)
    assert r["id"] == wid == wandb_run_id(tmp_path, record["run_id"])
    assert (r["group"], r["job_type"], r["exit"]) == ("sw", "lr_sweep_summary", 0)
    s = r["summary"]
    assert s["lr_sweep/bs16/best_lr"] == lrs[2] and s["lr_sweep/bs16/cliff_lr"] == lrs[3]
    assert s["lr_sweep/bs16/cliff_over_x"] == pytest.approx(0.5)
    assert s["lr_x_unstable"] == lrs[-1]
    assert s["tables/lr_sensitivity/nrows"] == 5 and s["tables/lr_sweep_points/nrows"] == 5


# ---------------------------------------------------------------- the summary keys (pure)


def _comparison() -> dict[str, Any]:
    """A comparison.json shape with two large batches, two seeds, a sweep and a ladder."""
    final = {"at": 40.0, "metric": "val_loss", "small": 5.5, "large": 5.4, "difference": -0.1}
    final |= {"relative": -0.018, "test": {"interval": [-0.2, -0.01], "p_value": 0.03}}
    final |= {"val_se": {"difference": 0.02, "exceeds": True}}
    comps = [
        {
            "large_batch_size": bs,
            "small_batch_size": 16,
            "per_step_verdict": "supported",
            "per_token_verdict": "not supported",
            "paired_seeds": 2,
            "one_seed": False,
            "per_step": {"fraction_lower": 0.9, "final": final},
            "per_token": {"fraction_lower": 0.1, "final": {**final, "test": None, "val_se": None}},
            "curves": {"per_step": {"grid": [1.0, 2.0], "difference_mean": [0.1, -0.1]}},
            "matched_steps": [{"step": 1, "metric": "val_loss", "difference": 0.1}],
        }
        for bs in (64, 32)
    ]
    test = {
        "mean_difference": -0.05,
        "interval": [-0.08, -0.02],
        "interval_from": "windows",
        "large_lower": True,
        "large_higher": False,
        "seeds": [0, 1],
        "across_seeds": {"interval": [-0.1, 0.0], "p_value": 0.2},
    }
    sweep = summarise([{"lr": lr, "seed": 0, "final_loss": v, "train_se": 0.01} for lr, v in
                       ((0.001, 5.5), (0.002, 5.2), (0.004, float("nan")))], 2.0)  # fmt: skip
    return {
        "study_dir": "/s",
        "plots": [],
        "verdict": {
            "overall_per_step": "supported",
            "overall_per_token": "not supported",
            "one_seed": False,
            "comparisons": comps,
        },
        "evaluation": {
            "evaluate": {"confidence": 0.95},
            "of_compared_runs": True,
            "comparisons": [{**test, "large_batch_size": 64}, {**test, "large_batch_size": 32}],
            "models": [
                {"experiment": "small_batch", "batch_size": 16, "seed": 0, "test_loss": 5.0}
            ],
        },
        "schedules": {
            "x_unstable_lr": 0.01,
            "y_small_lr": 0.005,
            "z_large_lr": {64: 0.01, 32: 0.007},
        },
        "lr_sensitivity": {"batches": {"16": sweep}, "checks": {"x_within_2x_of_cliff": True}},
        "ladder": {
            "noise_scale": {"value": 30.0, "interval": [10.0, 90.0], "per_seed": {"0": 29.0}},
            "rungs": [{"batch_size": 16, "gradient_noise_scale": 40.0, "noise_regime": "below"}],
            "empirical_critical_batch": None,
        },
    }


def test_comparison_summary_keys() -> None:
    comp = _comparison()
    s = comparison_summary(comp)
    assert s["verdict/per_step"] == "supported" and s["verdict/per_token"] == "not supported"
    for bs in (32, 64):
        assert s[f"verdict/bs{bs}/per_token"] == "not supported"
        assert s[f"verdict/bs{bs}/step/final_difference"] == -0.1
        assert (
            s[f"verdict/bs{bs}/step/interval_low"],
            s[f"verdict/bs{bs}/step/interval_high"],
        ) == (
            -0.2,
            -0.01,
        )
        assert s[f"verdict/bs{bs}/step/val_se"] == 0.02
        assert f"verdict/bs{bs}/token/interval_low" not in s  # one value: no interval, no null
        assert s[f"test/bs{bs}/difference"] == -0.05
    # the unprefixed test keys are the smallest large batch's
    assert s["test/large_batch_size"] == 32 and s["test/interval_low"] == -0.08
    assert s["test/across_seeds/p_value"] == 0.2 and s["test/n_seeds"] == 2
    assert s["test/model/small_batch-bs16-seed0/loss"] == 5.0
    assert s["lr_x_unstable"] == 0.01 and s["lr_z_large"] == 0.007
    assert s["lr_z_large/bs64"] == 0.01
    assert s["lr_sweep/bs16/best_lr"] == 0.002 and s["lr_sweep/bs16/cliff_lr"] == 0.002
    assert s["lr_sweep/checks/x_within_2x_of_cliff"] is True
    assert s["noise/B_simple"] == 30.0 and s["noise/interval_high"] == 90.0
    assert s["noise/seed0"] == 29.0 and s["noise/bs16/regime"] == "below"
    assert "noise/critical_batch" not in s
    assert all(isinstance(v, (bool, int, float, str)) for v in s.values())
    assert len(matched_step_rows(comp["verdict"])) == 2
    assert curve_rows(comp["verdict"])[0] == [64, "per_step", 1.0, 0.1, None, None]
