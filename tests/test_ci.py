"""`.ci/run` must fail when nothing was tested (pytest's exit status 5)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pytest_status, ci_status", [(0, 0), (1, 1), (5, 5)])
def test_ci_passes_only_when_tests_ran_and_passed(tmp_path, pytest_status, ci_status):
    """Stand-ins for python and pip (installs succeed; pytest exits with the given status)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(
        f'#!/bin/sh\ncase "$*" in *pytest*) exit {pytest_status};; esac\nexit 0\n'
    )
    (bin_dir / "pip").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    res = subprocess.run(
        ["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == ci_status, res.stderr
    if pytest_status == 5:
        assert "collected no tests" in res.stderr
