"""Resume: the same command after a crash continues the run exactly; a finished run is reported,
not redone; runs of one study never share checkpoints."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_utils import (
    REPO,
    SHORT_RUN,
    assert_same_losses,
    cli,
    cli_cmd,
    run_dirs,
    train_losses,
    val_steps,
)

from batchsize_study.checkpointing import ResumeCallback, _rng_state, _set_rng_state
from batchsize_study.config import validate
from batchsize_study.experiments import run
from batchsize_study.runtime import config_hash
from batchsize_study.study import make_run_id

RUN = SHORT_RUN


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, "the run ended before the condition was met"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _checkpoints(study: Path) -> list[Path]:
    return list(study.glob("runs/*/checkpoints/step*.ckpt"))


def _per_step(metrics_csv: str | os.PathLike, column: str) -> dict[int, float]:
    """step -> a column of the training rows of a metrics.csv."""
    with open(metrics_csv, newline="") as fh:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(fh) if r["train_loss"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run both resume tests compare against (in process, same settings)."""
    from conftest import make_cfg

    ref = run(make_cfg(tmp_path_factory.mktemp("ref"), *RUN))
    assert ref["status"] == "completed"
    return ref


def test_sigkill_then_same_command_resumes_with_identical_losses(reference, tmp_path):
    ref = reference
    study = tmp_path / "killed"
    proc = subprocess.Popen(
        cli_cmd(study, *RUN), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # Mid-run, last.ckpt is a link to the newest step file (one serialisation per save).
        _wait_for(lambda: list(study.glob("runs/*/checkpoints/last.ckpt")), proc)
    finally:
        proc.kill()  # SIGKILL: no handler runs, as after a power loss
        proc.wait()
    (rd,) = run_dirs(study)
    assert not (rd / "result.json").exists(), "the run finished before it was killed"
    last = rd / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and (rd / "checkpoints" / os.readlink(last)).is_file()
    assert os.readlink(last) in [p.name for p in _checkpoints(study)]

    done = cli(study, *RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming run" in done.stdout + done.stderr
    rec = json.loads((rd / "result.json").read_text())
    assert rec["status"] == "completed" and rec["steps_done"] == 20

    assert_same_losses(rd / "metrics.csv", ref["metrics_csv"])
    assert val_steps(rd / "metrics.csv") == val_steps(ref["metrics_csv"]) == [10, 20]
    assert rec["final_val_loss"] == pytest.approx(ref["final_val_loss"], abs=1e-5)


def test_finished_run_is_reported_not_redone(cfg_factory, tmp_path):
    overrides = (*RUN, "max_steps=4", "warmup_steps=1", "val_every_steps=2")
    first = run(cfg_factory(*overrides))
    csv_path = Path(first["metrics_csv"])
    before = (csv_path.stat().st_mtime_ns, (csv_path.parent / "result.json").read_bytes())
    again = run(cfg_factory(*overrides))
    assert again["finished_at"] == first["finished_at"]
    assert (csv_path.stat().st_mtime_ns, (csv_path.parent / "result.json").read_bytes()) == before
    forced = run(cfg_factory(*overrides, "force=true"))
    assert forced["finished_at"] > first["finished_at"] and forced["status"] == "completed"
    assert sorted(train_losses(csv_path)) == list(range(1, 5))  # rewritten, not appended
    # Killed after the last checkpoint but before the record: the same command trains nothing
    # and still records the final losses (from metrics.csv).
    (csv_path.parent / "result.json").unlink()
    late = run(cfg_factory(*overrides))
    assert late["status"] == "completed" and late["steps_done"] == 4
    for key in ("final_train_loss", "final_val_loss", "final_val_ppl"):
        assert late[key] == pytest.approx(forced[key], rel=1e-6), key


def test_runs_of_one_study_never_share_a_run_folder(cfg_factory):
    def run_id(*overrides: str, lr: float = 1e-3) -> str:
        c = validate(cfg_factory("experiment=small_batch", "lr=0.001", *overrides))
        return make_run_id(c.task, c.batch_size, c.seed, config_hash(c, lr))

    base = run_id()
    differ = [
        run_id("seed=1"),
        run_id("batch_size=32"),
        run_id(lr=2e-3),
        run_id("max_steps=41"),
        run_id("model.hidden_size=64"),
        run_id("data.max_documents=120"),
        run_id("optim.weight_decay=0.0"),
        run_id("trainer.devices=2", "trainer.accelerator=cpu"),
    ]
    assert base not in differ and len(set(differ)) == len(differ)
    # What does not change the computation maps to the same folder (so it resumes).
    assert run_id("checkpoint_every_steps=7", "logger=default", "force=true") == base


def test_checkpoint_rng_state_roundtrips_with_weights_only(tmp_path):
    cb = ResumeCallback(None, 10)
    path = tmp_path / "rng.pt"
    torch.save(cb.state_dict(), path)
    expected = (torch.rand(3), __import__("random").random())
    cb.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert __import__("random").random() == expected[1]
    _set_rng_state(_rng_state())  # and the current state round-trips too


@pytest.mark.slow
def test_sigterm_checkpoints_marks_interrupted_and_resumes(reference, tmp_path):
    ref = reference
    study = tmp_path / "preempted"
    proc = subprocess.Popen(
        cli_cmd(study, *RUN),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: _checkpoints(study), proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, out[-2000:]
    (rd,) = run_dirs(study)
    rec = json.loads((rd / "result.json").read_text())
    assert rec["status"] == "interrupted", rec["message"]
    assert 5 <= rec["steps_done"] < 20 and "resume" in rec["message"]
    ckpt = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == rec["steps_done"]

    done = cli(study, *RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads((rd / "result.json").read_text())
    assert rec["status"] == "completed" and rec["steps_done"] == 20
    assert_same_losses(rd / "metrics.csv", ref["metrics_csv"])
    assert val_steps(rd / "metrics.csv") == [10, 20]


def test_resume_late_in_the_run_keeps_whole_run_state(reference, tmp_path):
    """Resumed 5 steps before the end: the record's final train loss is the mean of the last 10
    steps of the whole run (not of the 5 run since the resume), and the noise-scale EMAs and the
    detector's smoothed loss continue from the checkpoint instead of restarting."""
    import shutil

    from conftest import make_cfg

    from batchsize_study.metrics import read_metrics

    ref_dir = Path(reference["metrics_csv"]).parent
    study = tmp_path / "late"
    run_dir = study / "runs" / ref_dir.name
    shutil.copytree(ref_dir, run_dir)
    (run_dir / "result.json").unlink()
    for late in ("last.ckpt", "step000020.ckpt"):
        (run_dir / "checkpoints" / late).unlink()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["step000015.ckpt"]

    rec = run(make_cfg(study, *RUN))
    assert rec["status"] == "completed" and rec["steps_done"] == 20
    assert_same_losses(run_dir / "metrics.csv", reference["metrics_csv"])
    assert rec["final_train_loss"] == pytest.approx(reference["final_train_loss"], abs=1e-6)
    got, want = rec["noise"]["final"], reference["noise"]["final"]
    assert got["g2"] == pytest.approx(want["g2"], rel=1e-4)
    # Measured steps: every noise.split_every-th (4) of the 20, across the resume.
    assert rec["noise"]["run_mean"]["steps"] == reference["noise"]["run_mean"]["steps"] == 5
    smoothed = read_metrics(run_dir / "metrics.csv").smoothed_loss
    assert smoothed[-1] == pytest.approx(read_metrics(reference["metrics_csv"]).smoothed_loss[-1])


SLOW_STEP = 0.25
"""Seconds the first process of the interrupted run sleeps per step: longer than the resumed one."""


def test_interrupted_run_resumed_times_the_whole_run(tmp_path, monkeypatch):
    """Issue 19: a run pre-empted at step 12 and resumed keeps one clock. elapsed_s continues
    from the first process's last row (monotone across the resume), wall_seconds covers the first
    process's training too, and tokens/s is the median over the whole run's steps, each process's
    start-up steps (the first three after it starts) left out."""
    from conftest import make_cfg

    study = tmp_path / "preempted"
    original = ResumeCallback.on_train_batch_end

    def slow_then_preempted(self, trainer, *args):
        time.sleep(SLOW_STEP)
        if trainer.global_step == 12:
            self.sigterm = True  # what the SIGTERM handler does
        original(self, trainer, *args)

    with monkeypatch.context() as m:
        m.setattr(ResumeCallback, "on_train_batch_end", slow_then_preempted)
        with pytest.raises(SystemExit):
            run(make_cfg(study, *RUN))
    (rd,) = run_dirs(study)
    first = json.loads((rd / "result.json").read_text())
    assert first["status"] == "interrupted" and first["steps_done"] == 12
    before = _per_step(rd / "metrics.csv", "elapsed_s")
    first_process = before[12]  # its training time
    assert first_process >= 11 * SLOW_STEP

    rec = run(make_cfg(study, *RUN))
    assert rec["status"] == "completed" and rec["steps_done"] == 20
    elapsed = _per_step(rd / "metrics.csv", "elapsed_s")
    assert sorted(elapsed) == list(range(1, 21))
    assert {s: elapsed[s] for s in before} == before  # the first process's rows stay
    clock = [elapsed[s] for s in range(1, 21)]
    assert clock == sorted(clock) and elapsed[13] > first_process
    assert rec["wall_seconds"] >= elapsed[20] > first_process

    rates = _per_step(rd / "metrics.csv", "tokens_per_second")
    steady = [rates[s] for s in range(1, 21) if s not in (1, 2, 3, 13, 14, 15)]
    assert rec["tokens_per_second"] == pytest.approx(statistics.median(steady))


def test_run_resumed_at_max_steps_records_the_whole_runs_timing(cfg_factory):
    """Issue 19: killed after its last checkpoint but before its record, the same command trains
    nothing and still records the run's throughput, MFU and time (from metrics.csv and the
    start-up steps kept in the checkpoint), not None."""
    overrides = (*RUN, "max_steps=4", "warmup_steps=1", "val_every_steps=2", "peak_flops=1e12")
    first = run(cfg_factory(*overrides))
    csv_path = Path(first["metrics_csv"])
    assert first["tokens_per_second"] == _per_step(csv_path, "tokens_per_second")[4]
    (csv_path.parent / "result.json").unlink()

    late = run(cfg_factory(*overrides))
    assert late["status"] == "completed" and late["steps_done"] == 4
    assert late["tokens_per_second"] is not None and late["mfu"] is not None
    assert late["tokens_per_second"] == pytest.approx(first["tokens_per_second"])
    assert late["mfu"] == pytest.approx(first["mfu"])
    assert late["wall_seconds"] >= _per_step(csv_path, "elapsed_s")[4] > 0
