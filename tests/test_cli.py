"""The command line: bad input fails before any work with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, study: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "batchsize_study",
            f"study.dir={study}",
            "logger=csv",
            "debug=smoke",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def last_line(p: subprocess.CompletedProcess) -> str:
    return [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1]


def test_impossible_batch_split_names_both(tmp_path):
    p = cli("batch_size=10", "micro_batch_size=4", study=tmp_path)
    assert p.returncode == 2
    line = last_line(p)
    assert line.startswith("error:") and "batch_size=10" in line and "micro_batch_size=4" in line
    assert not (tmp_path / "runs").exists()


def test_unknown_experiment_lists_the_choices(tmp_path):
    p = cli("experiment=nope", study=tmp_path)
    assert p.returncode == 2
    line = last_line(p)
    assert line.startswith("error:") and "experiment=nope" in line
    for choice in ("superconvergence", "small_batch", "large_batch"):
        assert choice in line


def test_missing_text_corpus_is_a_clear_error(tmp_path):
    p = cli("data=text", "data.path=/nonexistent", study=tmp_path)
    assert p.returncode == 2
    line = last_line(p)
    assert line.startswith("error:") and "data.path='/nonexistent'" in line
    assert not (tmp_path / "runs").exists()


def test_wrong_type_names_the_key(tmp_path):
    p = cli("batch_size=abc", study=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = last_line(p)
    assert line.startswith("error: batch_size") and "abc" in line


def test_trainer_override_of_a_derived_argument_is_refused(tmp_path):
    """+trainer.accumulate_grad_batches would silently replace the derived accumulation while
    the record states the planned one."""
    p = cli("+trainer.accumulate_grad_batches=3", study=tmp_path)
    assert p.returncode == 2
    line = last_line(p)
    assert line.startswith("error: trainer.accumulate_grad_batches=3:") and "batch_size" in line
    assert not (tmp_path / "runs").exists()


def test_unknown_appended_key_is_refused(tmp_path):
    p = cli("+model.hiden_size=64", study=tmp_path)
    assert p.returncode == 2
    assert last_line(p).startswith("error: model.hiden_size=64: unknown key; use one of")
