"""wandb on (offline, the default logger): two runs of one study in one process land in
<study.dir>/wandb/offline-run-*/ with their metrics, config and summary, share a group, carry
their experiment as job_type, and leave no wandb process behind. A training run is one wandb run
across crashes (a resumed process logs what wandb lacks, never a step twice); every row carries
tokens_seen; WANDB_MODE in the environment wins over the config."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_utils import (
    REPO,
    SHORT_RUN,
    assert_fresh_interpreter_runs,
    cli,
    cli_cmd,
    run_dirs,
    train_losses,
)
from conftest import make_cfg

from batchsize_study.experiments import run
from batchsize_study.wandb_utils import _wandb_records

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402


def wandb_records(path: Path) -> Iterator[bytes]:
    """The protobuf records of an offline run's .wandb file: the package's own reader of the
    LevelDB-style log (it also backfills a resumed run from it), after the header check."""
    assert path.read_bytes()[:4] == b":W&B", path
    yield from _wandb_records(path)


def read_offline_run(folder: Path) -> dict[str, Any]:
    """run info, config (initial + updates), summary and history rows of one offline run."""
    (path,) = folder.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "exit": None}
    out["metrics"] = {}  # define_metric: name (or glob) -> step_metric
    # the id in the folder's name; the run record repeats it (a process killed early may have
    # left a file without one)
    out["id"] = re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-(.+)", folder.name)[1]
    for raw in wandb_records(path):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # the tail of a killed process's file
            break
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            assert rec.run.run_id == out["id"], folder
            out["group"], out["job_type"] = rec.run.run_group, rec.run.job_type
            out["name"] = rec.run.display_name
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "summary":
            for i in rec.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "history":
            out["history"].append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
        elif kind == "metric":
            out["metrics"][rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
    return out


def wandb_children(pid: int) -> list[str]:
    """wandb service processes started by ``pid`` (wandb-core is given ``--pid <parent>``)."""
    ps = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    out = []
    for line in ps.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or "wandb" not in parts[2]:
            continue
        if int(parts[1]) == pid or f"--pid {pid}" in parts[2]:
            out.append(line.strip())
    return out


def test_offline_wandb_runs_hold_metrics_and_leave_no_process(tmp_path: Path) -> None:
    sdir = tmp_path / "study"
    recs = {
        exp: run(make_cfg(sdir, f"experiment={exp}", "logger=default", "study.name=wb_smoke"))
        for exp in ("superconvergence", "small_batch")
    }
    assert recs["superconvergence"]["status"] == "diverged"
    assert recs["small_batch"]["status"] == "completed"

    folders = sorted((sdir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2, list((sdir / "wandb").iterdir())
    assert not (sdir / "wandb" / "wandb").exists()
    runs = {r["job_type"]: r for r in map(read_offline_run, folders)}
    assert set(runs) == {"superconvergence", "small_batch"}
    for job, r in runs.items():
        rec = recs[job]
        assert r["group"] == "wb_smoke" and r["name"] == rec["run_id"] and r["exit"] == 0
        # every optimizer step's metrics are in the history
        steps = {h["trainer/global_step"] for h in r["history"] if "train/loss" in h}
        assert steps == set(range(1, rec["steps_done"] + 1))
        # x, y, z, batch sizes and accumulation are in the config
        derived = r["config"]["derived"]
        assert derived["batch_size"] == rec["batch_size"] == r["config"]["batch_size"]
        assert derived["accumulate_grad_batches"] == rec["accumulate_grad_batches"]
        assert derived["peak_lr"] == pytest.approx(rec["lr"])
        # final losses and unstable_lr in the summary; val/loss as its minimum
        s = r["summary"]
        assert s["final_train_loss"] == pytest.approx(rec["final_train_loss"])
        assert s["final_val_loss"] == pytest.approx(rec["final_val_loss"])
        with open(Path(rec["metrics_csv"]), newline="") as fh:
            vals = [float(row["val_loss"]) for row in csv.DictReader(fh) if row["val_loss"]]
        assert s["val/loss"] == {"min": pytest.approx(min(vals))}
    x = recs["superconvergence"]["unstable_lr"]
    assert runs["superconvergence"]["summary"]["unstable_lr"] == pytest.approx(x)
    assert runs["superconvergence"]["summary"]["lr_x_unstable"] == pytest.approx(x)
    small = runs["small_batch"]
    assert small["config"]["derived"]["unstable_lr"] == pytest.approx(x)
    assert small["summary"]["lr_x_unstable"] == pytest.approx(x)
    assert small["summary"]["lr_y_small"] == pytest.approx(recs["small_batch"]["lr"])

    deadline = time.monotonic() + 15
    while wandb_children(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert wandb_children(os.getpid()) == []


# ---------------------------------------------------------------- one wandb run across crashes


def _write_metrics(path: Path, steps: range, val_steps: set[int], tokens_per_step: int) -> None:
    """A metrics.csv as the recorder writes it: one training row per step, validation rows."""
    from batchsize_study.metrics import CSV_FIELDS

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for s in steps:
            tokens = s * tokens_per_step
            w.writerow(
                {"step": s, "tokens": tokens, "lr": 0.01 * s, "train_loss": 10 - s / 10}
                | {"grad_norm": 1.0, "tokens_per_second": 100.0, "elapsed_s": float(s)}
            )
            if s in val_steps:
                w.writerow({"step": s, "tokens": tokens, "val_loss": 9 - s / 10, "val_ppl": 9.0})


def _steps(runs: list[dict[str, Any]], key: str) -> list[int]:
    return [h["trainer/global_step"] for r in runs for h in r["history"] if key in h]


@pytest.mark.parametrize("received", [3, 8])
def test_resumed_process_logs_what_wandb_lacks_and_no_step_twice(
    tmp_path: Path, received: int
) -> None:
    """The first process's wandb got steps 1..received before a kill; metrics.csv reached step 8
    and the checkpoint step 6. The resumed process (same run id) logs from metrics.csv the steps
    up to 6 that wandb lacks, then of the steps it trains again (7, 8, then 9) only the new."""
    from batchsize_study.config import LoggerConfig
    from batchsize_study.wandb_utils import finish_wandb, make_wandb_logger, wandb_record

    sdir, rid, tps = tmp_path / "study", "small_batch-bs8-seed0-0123456789", 64
    rd = sdir / "runs" / rid
    rd.mkdir(parents=True)
    _write_metrics(rd / "metrics.csv", range(1, 9), {5}, tps)

    def start(resume_step: int) -> Any:
        return make_wandb_logger(
            LoggerConfig(),
            str(sdir),
            "g",
            "small_batch",
            rid,
            {},
            run_dir=rd,
            resume_step=resume_step,
            tokens_per_step=tps,
        )

    first = start(0)
    for s in range(1, received + 1):
        first.log_metrics({"train/loss": 10 - s / 10, "train/lr": 0.01 * s}, step=s)
        if s == 5:
            first.log_metrics({"val/loss": 9 - s / 10}, step=s)
    finish_wandb([first])
    second = start(6)
    for s in (7, 8, 9):
        second.log_metrics({"train/loss": 10 - s / 10, "train/lr": 0.01 * s}, step=s)
    info = wandb_record([second])["wandb"]
    finish_wandb([second])

    folders = sorted((sdir / "wandb").glob("offline-run-*"))
    runs = [read_offline_run(f) for f in folders]
    assert len(runs) == 2 and {r["id"] for r in runs} == {info["id"]}
    assert info["folders"] == [str(f) for f in folders] and info["path"] == str(folders[1])
    assert _steps(runs, "train/loss") == list(range(1, 10))  # every step once, in order
    assert _steps(runs, "val/loss") == [5]
    assert _steps(runs[1:], "train/loss") == (list(range(4, 10)) if received == 3 else [9])
    for h in (h for r in runs for h in r["history"]):
        assert h["_step"] == h["trainer/global_step"]
        assert h["tokens_seen"] == h["trainer/global_step"] * tps
        if "train/loss" in h:
            assert h["train/loss"] == pytest.approx(10 - h["_step"] / 10)


def _wait_for(pred: Any, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, "the run ended before the condition was met"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # two CLI processes: 70-100 s on 2 busy cores
def test_sigkill_then_same_command_continues_one_wandb_run(tmp_path: Path) -> None:
    study, args = tmp_path / "killed", (*SHORT_RUN, "logger=default")
    proc = subprocess.Popen(
        cli_cmd(study, *args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(lambda: list(study.glob("runs/*/checkpoints/last.ckpt")), proc)
    finally:
        proc.kill()  # SIGKILL: rows queued for wandb in that process are lost
        proc.wait()
    (rd,) = run_dirs(study)
    assert not (rd / "result.json").exists(), "the run finished before it was killed"

    done = cli(study, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads((rd / "result.json").read_text())
    assert rec["status"] == "completed" and rec["steps_done"] == 20

    folders = sorted((study / "wandb").glob("offline-run-*"))
    runs = [read_offline_run(f) for f in folders]
    assert len(runs) == 2 and len({r["id"] for r in runs}) == 1, "not one wandb run"
    assert _steps(runs, "train/loss") == list(range(1, 21))  # every step once, in order
    assert _steps(runs, "val/loss") == [10, 20]
    losses = train_losses(rd / "metrics.csv")
    for h in (h for r in runs for h in r["history"] if "train/loss" in h):
        assert h["train/loss"] == pytest.approx(losses[h["trainer/global_step"]], abs=1e-5)
    assert rec["wandb"]["id"] == runs[0]["id"] and rec["wandb"]["mode"] == "offline"
    assert rec["wandb"]["folders"] == [str(f) for f in folders]
    assert rec["wandb"]["path"] == str(folders[-1])

    deadline = time.monotonic() + 15  # the killed process's wandb service exits too
    while wandb_children(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert wandb_children(proc.pid) == []


# ---------------------------------------------------------------- the x-axis, the mode, the id


def test_every_row_has_tokens_seen_and_the_step_stays_the_default_axis(tmp_path: Path) -> None:
    sdir = tmp_path / "study"
    overrides = ("max_steps=6", "warmup_steps=1", "val_every_steps=3", "checkpoint_every_steps=3")
    rec = run(make_cfg(sdir, *SHORT_RUN, *overrides, "logger=default"))
    assert rec["status"] == "completed"
    (folder,) = (sdir / "wandb").glob("offline-run-*")
    r = read_offline_run(folder)
    rows = [h for h in r["history"] if "train/loss" in h or "val/loss" in h]
    assert [h["trainer/global_step"] for h in rows if "val/loss" in h] == [3, 6]
    for h in rows:  # loss vs tokens (or vs LR) can be drawn from every row
        assert h["tokens_seen"] == h["trainer/global_step"] * rec["tokens_per_step"]
        assert "train/lr" in h
    m = r["metrics"]
    assert m["*"] == "trainer/global_step"  # the step stays every panel's default x-axis
    for name in ("tokens_seen", "train/lr", "train/loss", "val/loss"):
        assert m[name] == "trainer/global_step", name
    assert rec["wandb"]["id"] == r["id"] and rec["wandb"]["path"] == str(folder)


def test_wandb_mode_environment_wins_and_offline_is_the_default(tmp_path: Path) -> None:
    from batchsize_study.wandb_utils import resolve_wandb_mode

    default = make_cfg(tmp_path, "logger=default").logger.wandb_mode
    online = make_cfg(tmp_path, "logger=wandb_online").logger.wandb_mode
    assert resolve_wandb_mode(default, {}) == "offline"
    assert resolve_wandb_mode(online, {}) == "online"
    assert resolve_wandb_mode(default, {"WANDB_MODE": "online"}) == "online"
    assert resolve_wandb_mode(online, {"WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode(online, {"WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_wandb_mode(default, {"WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_wandb_mode(default, {"WANDB_DISABLED": "true"}) == "disabled"
    assert resolve_wandb_mode(default, {"WANDB_MODE": "nonsense"}) == "offline"


def test_environment_wandb_mode_is_not_overridden(tmp_path: Path, monkeypatch) -> None:
    """Before, the offline default was forced on wandb (and into os.environ) whatever the
    environment said. Checked with modes that need no network."""
    from batchsize_study.config import LoggerConfig
    from batchsize_study.wandb_utils import finish_wandb, make_wandb_logger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    lg = make_wandb_logger(LoggerConfig(), str(tmp_path), "g", "small_batch", "r1", {})
    try:
        assert lg is None and os.environ["WANDB_MODE"] == "disabled"
    finally:
        finish_wandb([lg] if lg is not None else [])
    assert not list(tmp_path.glob("wandb/*run-*"))

    monkeypatch.setenv("WANDB_MODE", "offline")
    lg = make_wandb_logger(
        LoggerConfig(wandb_mode="online"), str(tmp_path), "g", "small_batch", "r2", {}
    )
    try:
        assert lg is not None and lg.experiment.offline
        assert os.environ["WANDB_MODE"] == "offline"
    finally:
        finish_wandb([lg] if lg is not None else [])


def test_wandb_run_id_is_stable_valid_and_per_study(tmp_path: Path) -> None:
    from batchsize_study.wandb_utils import choose_wandb_run_id, wandb_run_id

    rid = "small_batch-bs32-seed0-0123456789"
    a = wandb_run_id(tmp_path / "s1", rid)
    assert a == wandb_run_id(tmp_path / "s1", rid) == wandb_run_id(tmp_path / "x/../s1", rid)
    assert a.startswith("small-batch-bs32-seed0-0123456789-")
    assert a != wandb_run_id(tmp_path / "s2", rid)
    assert a != wandb_run_id(tmp_path / "s1", rid.replace("seed0", "seed1"))
    odd = wandb_run_id(tmp_path, "Lr_Sweep:/#?'" * 10)
    for wid in (a, odd):
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", wid) and len(wid) <= 64, wid
    # force=true (start over) gets a new wandb run once the old one has folders
    wdir = tmp_path / "s1" / "wandb"
    assert choose_wandb_run_id(tmp_path / "s1", rid, None, wdir, force=True) == a
    (wdir / f"offline-run-20250101_000000-{a}").mkdir(parents=True)
    assert choose_wandb_run_id(tmp_path / "s1", rid, None, wdir, force=False) == a
    assert choose_wandb_run_id(tmp_path / "s1", rid, None, wdir, force=True) != a


def test_wandb_utils_loads_lightning_only_for_the_training_logger() -> None:
    """The results (compare) need wandb_utils' mode and id rules, not Lightning (~5 s to import
    on 2 cores); the training logger is still Lightning's WandbLogger, logging on rank 0 only."""
    code = (
        "import sys, batchsize_study.wandb_utils as w, batchsize_study.wandb_results; "
        "assert 'lightning' not in sys.modules, 'lightning imported'; "
        "from lightning.pytorch.loggers import WandbLogger; "
        "from lightning.pytorch.utilities import rank_zero_only; "
        "assert issubclass(w.StudyWandbLogger, WandbLogger); "
        "assert w.StudyWandbLogger is w.study_logger_class(); "
        "rank_zero_only.rank = 1; "
        "assert w.StudyWandbLogger.log_metrics(None, {'train/loss': 1.0}, 1) is None"
    )
    assert_fresh_interpreter_runs(code)
