"""experiment=lr_sweep as jobs (issue 20 item 4): the grid points of one multirun run in parallel
and give the serial sweep's answer; done points are reported, collapsed indices skipped."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from cli_utils import cli
from conftest import CONF, make_cfg
from hydra import compose, initialize_config_dir

from batchsize_study.errors import ConfigError
from batchsize_study.experiments import run
from batchsize_study.lr_sensitivity import SUMMARY
from batchsize_study.report.sweeps import sweeps
from batchsize_study.study import read_records, select

# Long enough (~1.8 s per point here, the overlap 1.3-1.8 s) that the two joblib workers'
# start-up skew cannot make the first point finish before the second starts: at 12 steps (~0.4 s
# per point) it once did, on an idle machine.
SHORT = ("max_steps=120", "warmup_steps=10", "val_every_steps=60")
GRID = ("experiment=lr_sweep", "sweep.multiples=[0.25,1]", *SHORT)
FP32 = "precision=32-true"  # the CLI's smoke settings (cli_utils.SMOKE) have it too


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """One superconvergence record in two identical study folders; the first swept serially."""
    base = tmp_path_factory.mktemp("sweep_jobs")
    serial, jobs = base / "serial", base / "jobs"
    assert run(make_cfg(serial, "experiment=superconvergence", FP32))["status"] == "diverged"
    shutil.copytree(serial, jobs)
    summary = run(make_cfg(serial, *GRID, FP32))
    assert summary["experiment"] == SUMMARY and summary["n_points"] == 2
    return serial, jobs, summary


def _answer(study: Path) -> dict[int, dict[str, Any]]:
    """What the report reads: per batch size the best LR, the cliff and the per-LR losses."""
    return {
        bs: {k: s[k] for k in ("best_lr", "cliff_lr", "cliff_upper_lr", "noise_method")}
        | {"losses": [(r["lr"], r["losses"]) for r in s["per_lr"]]}
        for bs, s in sweeps(select(study)).items()
    }


def _content(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ("_path", "finished_at")}


def test_multirun_expands_the_grid_into_point_jobs():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["experiment=lr_sweep", "sweep.multiples=[0.25,1,4]", "sweep.seeds=[0,1]"],
            return_hydra_config=True,
        )
    assert cfg.hydra.sweeper.params["sweep.point"] == "range(0,6)"
    assert cfg.sweep.point is None  # a single run trains the whole grid


def test_point_jobs_run_in_parallel_and_give_the_serial_answer(studies):
    serial, jobs, summary = studies
    res = cli(jobs, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *GRID, multirun=True)
    assert res.returncode == 0, res.stderr[-3000:]
    points = read_records(jobs, "lr_sweep")
    assert sorted(r["run_id"] for r in points) == sorted(p["run_id"] for p in summary["points"])
    (a0, a1), (b0, b1) = [(r["finished_at"] - r["wall_seconds"], r["finished_at"]) for r in points]
    assert max(a0, b0) < min(a1, b1), f"the two point jobs did not overlap: {a0, a1, b0, b1}"
    assert _answer(jobs) == _answer(serial)
    (written,) = read_records(jobs, SUMMARY)  # by the job that completed the grid
    assert written["run_id"] == summary["run_id"]
    for k in ("best_lr", "cliff_lr", "grid", "seeds"):
        assert written[k] == summary[k], k
    assert written["wall_seconds"] < written["compute_seconds"]  # elapsed < the points' sum


def test_a_done_point_is_reported_and_a_collapsed_index_skipped(studies, caplog):
    serial, _, summary = studies
    caplog.set_level(logging.INFO, logger="batchsize_study")
    done = {r["run_id"]: r["finished_at"] for r in read_records(serial, "lr_sweep")}
    rec = run(make_cfg(serial, *GRID, FP32, "sweep.point=1"))
    assert rec["run_id"] in done and rec["finished_at"] == done[rec["run_id"]]
    assert "already finished" in caplog.text
    # This job completes the grid: it writes the serial run's summary, same id and content.
    (again,) = read_records(serial, SUMMARY)
    assert _content(again) == _content(summary)

    caplog.clear()  # 1x twice: index 2 snaps onto index 1's LR; 4x is not run yet
    wide = ("experiment=lr_sweep", "sweep.multiples=[0.25,1,1,4]", *SHORT, FP32)
    out = run(make_cfg(serial, *wide, "sweep.point=2"))
    assert out["status"] == "skipped" and "the LR of point 1" in out["message"]
    assert "skipped" in caplog.text and "1 of 3 grid points still to run" in caplog.text
    assert {r["run_id"] for r in read_records(serial, "lr_sweep")} == set(done)
    assert len(read_records(serial, SUMMARY)) == 1
    with pytest.raises(ConfigError, match="sweep.point"):
        run(make_cfg(serial, *wide, "sweep.point=4"))
