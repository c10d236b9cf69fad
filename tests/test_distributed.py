"""Past one device, with Lightning's and Hydra's engines: two-process DDP on CPU (gloo), the
refusals that keep records correct, Hydra's submitit launcher, and the SLURM launcher config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_utils import cli, last_line, run_dirs, train_losses, val_steps
from conftest import CONF
from hydra import compose, initialize_config_dir

from batchsize_study.experiments import run
from batchsize_study.study import read_records

DDP = (
    "experiment=small_batch",
    "lr=0.003",
    "max_steps=10",
    "warmup_steps=2",
    "val_every_steps=5",
    "checkpoint_every_steps=5",
    "micro_batch_size=4",
    "precision=32-true",
)


def test_ddp_two_cpu_processes_match_one_process(cfg_factory, tmp_path):
    """Same effective batch: accumulation halves, the loss curve is the same to float precision,
    and only rank 0 writes (one record, each CSV row once)."""
    single = run(cfg_factory(*DDP, study_dir=tmp_path / "single"))
    assert single["accumulate_grad_batches"] == 4 and single["devices"] == 1
    study = tmp_path / "ddp"
    res = cli(study, *DDP, "trainer=ddp_cpu", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (rd,) = run_dirs(study)
    rec = json.loads((rd / "result.json").read_text())
    assert rec["status"] == "completed" and rec["steps_done"] == 10
    assert (rec["devices"], rec["accumulate_grad_batches"], rec["batch_size"]) == (2, 2, 16)
    assert rec["tokens_seen"] == single["tokens_seen"]
    ddp, one = train_losses(rd / "metrics.csv"), train_losses(single["metrics_csv"])
    assert sorted(ddp) == list(range(1, 11))  # train_losses fails on a duplicated row
    for step in one:
        assert ddp[step] == pytest.approx(one[step], abs=1e-4), step
    assert val_steps(rd / "metrics.csv") == [5, 10]
    assert len(read_records(study)) == 1
    assert (res.stdout + res.stderr).count("small_batch: status completed") == 1  # rank 0 only


@pytest.mark.slow
def test_ddp_nan_on_one_rank_stops_both(tmp_path):
    study = tmp_path / "ddp_nan"
    res = cli(
        study,
        *DDP,
        "trainer=ddp_cpu",
        "+callbacks.nan._target_=faults.InjectNaN",  # poison a weight on rank 1 only
        "+callbacks.nan.step=3",
        "+callbacks.nan.rank=1",
        env={"PYTHONPATH": str(Path(__file__).parent)},
        timeout=240,  # a rank waiting on the other would hang here
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (rd,) = run_dirs(study)
    rec = json.loads((rd / "result.json").read_text())
    assert rec["status"] == "failed"
    assert rec["failed_step"] == rec["steps_done"] == 4
    assert "non-finite training loss (nan) at step 4" in rec["message"]


def test_ddp_inside_a_multirun_is_refused(tmp_path):
    study = tmp_path / "sweep"
    res = cli(study, *DDP, "trainer=ddp_cpu", "seed=0,1", multirun=True, timeout=180)
    assert res.returncode == 2, res.stderr[-3000:]
    line = last_line(res.stderr)
    assert line.startswith("error: trainer.strategy='ddp'") and "multirun" in line
    assert not run_dirs(study)


@pytest.mark.slow
def test_ddp_spawn_is_refused(tmp_path):
    study = tmp_path / "spawn"
    res = cli(study, *DDP, "trainer=ddp_cpu", "trainer.strategy=ddp_spawn", timeout=180)
    assert res.returncode == 2, res.stderr[-3000:]
    assert last_line(res.stderr).startswith("error: trainer.strategy='ddp_spawn'")
    assert not run_dirs(study)


def test_submitit_local_runs_a_sweep_as_separate_processes(tmp_path):
    study = tmp_path / "submitit"
    res = cli(
        study,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "experiment=superconvergence",
        "seed=0,1",
        multirun=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    recs = read_records(study)
    assert sorted(r["seed"] for r in recs) == [0, 1]
    assert all(r["status"] in ("diverged", "no_divergence") for r in recs)
    # submitit's local executor: one folder per job, named by the job's own process id.
    jobs = [p for p in study.glob("hydra/multirun/*/.submitit/*") if p.name.isdigit()]
    assert len(jobs) == 2
    assert all(list(j.glob("*_result.pkl")) for j in jobs)


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.max_num_timeout >= 1
    assert launcher.signal_delay_s > 0
