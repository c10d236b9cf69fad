"""Faults: a crash mid-checkpoint, a damaged checkpoint, a non-finite loss, an unreachable wandb,
an unwritable or full output folder. Each ends in a valid state and a clear record or message."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_utils import REPO, SHORT_RUN, cli, last_line, run_dirs, train_losses

from batchsize_study.checkpointing import AtomicCheckpointIO, find_resume_checkpoint
from batchsize_study.errors import UserError
from batchsize_study.experiments import run

SMALL = SHORT_RUN


def _children(pid: int) -> list[str]:
    """Command lines of the live child processes of ``pid`` (from /proc)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            if (
                int(stat.rsplit(")", 1)[1].split()[1]) == pid
                and stat.rsplit(")", 1)[1].split()[0] != "Z"
            ):
                out.append((p / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue
    return out


# ---------------------------------------------------------------- checkpoints


def test_failed_checkpoint_write_leaves_previous_intact(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 5}, target)
    before = target.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk went away mid-write")

    with pytest.raises(RuntimeError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "bad": Boom()}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


def test_sigkill_during_checkpoint_write_keeps_previous_chosen(tmp_path):
    ckdir = tmp_path / "checkpoints"
    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": {"w": torch.ones(2)}, "global_step": 5}, ckdir / "last.ckpt"
    )
    before = (ckdir / "last.ckpt").read_bytes()
    writer = (
        "import torch, sys\n"
        "from batchsize_study.checkpointing import AtomicCheckpointIO\n"
        "big = {'state_dict': {'w': torch.randn(64, 1024, 1024)}, 'global_step': 10}\n"
        "print('ready', flush=True)\n"
        "while True: AtomicCheckpointIO().save_checkpoint(big, sys.argv[1])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", writer, str(ckdir / "last.ckpt")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        while not list(ckdir.glob(".last.ckpt.*.tmp")) or (
            list(ckdir.glob(".last.ckpt.*.tmp"))[0].stat().st_size < 1 << 20
        ):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # the crash lands mid-write
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(ckdir.glob(".last.ckpt.*.tmp")), "the kill should have left a partial temp file"
    # The target is either the old file or a complete new one, never a torn one; it is chosen.
    path, step = find_resume_checkpoint(ckdir)
    assert path == str(ckdir / "last.ckpt")
    assert (ckdir / "last.ckpt").read_bytes() == before or step == 10


def test_damaged_last_checkpoint_falls_back_then_refuses(cfg_factory, tmp_path):
    first = run(cfg_factory(*SMALL))
    rd = Path(first["metrics_csv"]).parent
    ckdir = rd / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("*.ckpt")) == [
        "last.ckpt",
        "step000015.ckpt",
        "step000020.ckpt",
    ]
    losses = train_losses(rd / "metrics.csv")
    # Truncate the newest two (as a crash of the disk or a copy might); drop the record so the
    # same command continues the run rather than reporting it.
    for name in ("last.ckpt", "step000020.ckpt"):
        data = (ckdir / name).read_bytes()
        (ckdir / name).write_bytes(data[: len(data) // 3])
    (rd / "result.json").unlink()
    assert find_resume_checkpoint(ckdir) == (str(ckdir / "step000015.ckpt"), 15)
    again = run(cfg_factory(*SMALL))
    assert again["status"] == "completed" and again["steps_done"] == 20
    resumed = train_losses(rd / "metrics.csv")
    assert sorted(resumed) == list(range(1, 21))
    for step in range(16, 21):
        assert resumed[step] == pytest.approx(losses[step], abs=1e-5)

    # Every checkpoint damaged: a clear error, not a silent fresh start.
    (rd / "result.json").unlink()
    for p in ckdir.glob("*.ckpt"):
        p.write_bytes(b"not a checkpoint")
    csv_before = (rd / "metrics.csv").read_bytes()
    with pytest.raises(UserError, match=r"unreadable.*force=true"):
        run(cfg_factory(*SMALL))
    assert (rd / "metrics.csv").read_bytes() == csv_before


# ---------------------------------------------------------------- training faults


def test_nonfinite_loss_fails_the_run_with_step_and_reason(cfg_factory):
    rec = run(
        cfg_factory(*SMALL, "lr=1e6", "optim.grad_clip=null", "warmup_steps=0", "max_steps=20")
    )
    assert rec["status"] == "failed"
    assert "non-finite training loss" in rec["message"]
    assert rec["failed_step"] == rec["steps_done"] < 20
    assert f"at step {rec['failed_step']}" in rec["message"]


def test_injected_nan_stops_large_batch_at_that_step(cfg_factory):
    rec = run(
        cfg_factory(
            *SMALL,
            "experiment=large_batch",
            "batch_size=32",
            "micro_batch_size=16",
            "+callbacks.nan._target_=faults.InjectNaN",  # a test callback, added through config
            "+callbacks.nan.step=3",
        )
    )
    assert rec["status"] == "failed" and rec["experiment"] == "large_batch"
    assert rec["failed_step"] == rec["steps_done"] == 4  # the 4th optimizer step saw the NaN
    assert "non-finite training loss (nan) at step 4" in rec["message"]


def test_wandb_online_without_network_falls_back_offline_and_trains(
    cfg_factory, monkeypatch, caplog, tmp_path
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    caplog.set_level(logging.WARNING)
    t0 = time.monotonic()
    rec = run(
        cfg_factory(*SMALL, "max_steps=5", "logger=wandb_online", "logger.wandb_init_timeout=3")
    )
    assert time.monotonic() - t0 < 90  # bounded: the init timeout plus a short training run
    assert rec["status"] == "completed" and rec["steps_done"] == 5
    assert "falling back to offline" in caplog.text
    assert list((tmp_path / "study" / "wandb").glob("**/offline-run-*")), "no offline run written"
    time.sleep(1)
    assert not [c for c in _children(os.getpid()) if "wandb" in c]


# ---------------------------------------------------------------- output folder


def test_unwritable_study_dir_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = cli(blocker / "study", "experiment=small_batch", "lr=0.003")
    assert res.returncode == 2, res.stderr[-2000:]
    line = last_line(res.stderr)
    assert line.startswith("error: study.dir") and "writable" in line and str(blocker) in line


def test_write_probe_creates_nothing_and_survives_jobs_starting_together(tmp_path):
    """Jobs of one multirun (submitit, joblib) probe the same new study folder at once.

    The probe used to create the runs folder and remove it again, so one job could remove the
    folder another was writing its probe file into (CI: "cannot write there (No such file or
    directory)" from submitit_local). Many probes at once must all pass and leave nothing.
    """
    from concurrent.futures import ThreadPoolExecutor

    from batchsize_study.runtime import check_writable

    study = tmp_path / "new" / "study"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: check_writable(str(study)), range(400)))
    assert not (tmp_path / "new").exists()
    (study / "runs").mkdir(parents=True)  # another job's folder, already in use
    check_writable(str(study))
    assert (study / "runs").is_dir() and not list((study / "runs").iterdir())


def _limit_file_size(max_bytes: int):
    def apply() -> None:
        # Writes past max_bytes fail with EFBIG (instead of SIGXFSZ killing the process): a
        # stand-in for a full disk that needs no mount.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


@pytest.mark.slow
def test_full_disk_mid_run_is_a_clear_error_and_keeps_earlier_records(cfg_factory, tmp_path):
    study = tmp_path / "study"
    earlier = run(cfg_factory(*SMALL, "max_steps=5", "checkpoint_every_steps=5"))
    earlier_path = Path(earlier["metrics_csv"]).parent / "result.json"
    earlier_bytes = earlier_path.read_bytes()
    # The checkpoint (~600 kB) does not fit under 300 kB; the CSV and the record do.
    res = cli(study, *SMALL, "seed=1", preexec_fn=_limit_file_size(300_000))
    assert res.returncode == 2, res.stderr[-3000:]
    line = last_line(res.stderr)
    assert line.startswith(f"error: study.dir={study}") and "File too large" in line
    assert earlier_path.read_bytes() == earlier_bytes
    (failed,) = [d for d in run_dirs(study) if "seed1" in d.name]
    rec = json.loads((failed / "result.json").read_text())
    assert rec["status"] == "failed" and "could not write" in rec["message"]
    assert not list(failed.glob("checkpoints/.*.tmp")), "a half-written checkpoint was left"
