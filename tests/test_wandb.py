"""wandb on (offline, the default logger): two runs of one study in one process land in
<study.dir>/wandb/offline-run-*/ with their metrics, config and summary, share a group, carry
their experiment as job_type, and leave no wandb process behind."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_cfg

from batchsize_study.experiments import run

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of framed records


def wandb_records(path: Path) -> Iterator[bytes]:
    """The protobuf records of an offline run's .wandb file (header ':W&B', then per record a
    4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk


def read_offline_run(folder: Path) -> dict[str, Any]:
    """run info, config (initial + updates), summary and history rows of one offline run."""
    (path,) = folder.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "exit": None}
    for raw in wandb_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
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
