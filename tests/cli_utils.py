"""Run ``python -m batchsize_study`` as a user would (a subprocess from the repo root)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = ("debug=smoke", "logger=csv", "trainer.enable_progress_bar=false", "precision=32-true")


# A short fp32 small_batch run: a checkpoint every 5 steps, validation every 10 (resume and
# fault tests compare its per-step losses exactly).
SHORT_RUN = (
    "experiment=small_batch",
    "lr=0.003",
    "max_steps=20",
    "warmup_steps=5",
    "val_every_steps=10",
    "checkpoint_every_steps=5",
    "precision=32-true",
)


def assert_same_losses(metrics_csv: str | os.PathLike, reference_csv: str | os.PathLike) -> None:
    """Every optimizer step 1..20 present, each loss equal to the reference run's to 1e-5."""
    import pytest

    mine, theirs = train_losses(metrics_csv), train_losses(reference_csv)
    assert sorted(mine) == list(range(1, 21))
    for step in theirs:
        assert mine[step] == pytest.approx(theirs[step], abs=1e-5), step


def assert_fresh_interpreter_runs(code: str) -> None:
    """``code`` exits 0 in a new interpreter from the repo root (import-cost checks: what a
    module loads is only visible in a process that has imported nothing else)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def cli_cmd(study: str | os.PathLike, *overrides: str, multirun: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "batchsize_study"]
    if multirun:
        cmd.append("-m")
    return [*cmd, *SMOKE, f"study.dir={study}", *overrides]


def cli(
    study: str | os.PathLike,
    *overrides: str,
    multirun: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    **kwargs,
) -> subprocess.CompletedProcess:
    """Run the CLI to completion; stdout/stderr captured as text."""
    return subprocess.run(
        cli_cmd(study, *overrides, multirun=multirun),
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def train_losses(metrics_csv: str | os.PathLike) -> dict[int, float]:
    """step -> train_loss from a metrics.csv (training rows only); fails on a duplicated step."""
    out: dict[int, float] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["train_loss"]:
                step = int(row["step"])
                assert step not in out, f"step {step} recorded twice in {metrics_csv}"
                out[step] = float(row["train_loss"])
    return out


def val_steps(metrics_csv: str | os.PathLike) -> list[int]:
    with open(metrics_csv, newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r["val_loss"]]


def run_dirs(study: str | os.PathLike) -> list[Path]:
    return sorted(p for p in (Path(study) / "runs").glob("*") if p.is_dir())
