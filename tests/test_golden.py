"""Behaviour pinned across refactors: a smoke study's records, metrics.csv and comparison.json
must match the stored snapshot (times, paths and hashes of the config aside).

A change that is *meant* to alter the numbers regenerates the snapshot deliberately:
``BATCHSIZE_STUDY_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`` and says why in the
commit. Floats are compared to a relative 1e-6 (fp32 on one CPU is deterministic; the tolerance
absorbs printing and summation-order noise only).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import make_cfg

GOLDEN = Path(__file__).parent / "golden" / "smoke_study.json"

# Wall-clock, machine and path-dependent values: not part of the behaviour.
VOLATILE = {
    "wall_seconds",
    "tokens_per_second",
    "mfu",
    "peak_flops",
    "host_allocator",  # glibc's mallopt where there is one (runtime.tune_host_allocator)
    "finished_at",
    "elapsed_s",
    "_path",
    "run_id",
    "config_hash",
    "study_dir",
    "metrics_csv",
    "checkpoint",
    "upstream",
    "package_version",
    "command",
    "first_command",
}


def _normalise(obj: Any, sdir: str) -> Any:
    if isinstance(obj, dict):
        return {k: _normalise(v, sdir) for k, v in sorted(obj.items()) if k not in VOLATILE}
    if isinstance(obj, list):
        return [_normalise(v, sdir) for v in obj]
    if isinstance(obj, str):
        s = obj.replace(sdir, "<study>")
        s = re.sub(r"runs/[^/\s,)]+/", "runs/<run>/", s)
        # a run id ends in its config hash, which is volatile (see VOLATILE)
        return re.sub(r"(-seed\d+-)[0-9a-f]{10}\b", r"\1<hash>", s)
    return obj


def snapshot(sdir: Path) -> dict[str, Any]:
    """Records, per-step metrics (minus timing columns) and comparison.json of a study."""
    out: dict[str, Any] = {"records": {}, "metrics": {}}
    for rec_path in sorted((sdir / "runs").glob("*/result.json")):
        rec = json.loads(rec_path.read_text())
        exp = rec["experiment"]
        out["records"][exp] = _normalise(rec, str(sdir))
        with open(rec_path.parent / "metrics.csv", newline="") as fh:
            rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in csv.DictReader(fh)]
        out["metrics"][exp] = rows
    comparison = json.loads((sdir / "report" / "comparison.json").read_text())
    out["comparison"] = _normalise(comparison, str(sdir))
    return out


def _assert_same(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        assert sorted(got) == sorted(want), f"{where}: keys {sorted(set(got) ^ set(want))}"
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length"
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, str) and isinstance(got, str):
        try:  # metrics.csv cells are strings of numbers
            g, w = float(got), float(want)
        except ValueError:
            assert got == want, where
        else:
            assert g == pytest.approx(w, rel=1e-6, abs=1e-9) or (math.isnan(g) and math.isnan(w)), (
                where
            )
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), where
    else:
        assert got == want, where


def test_smoke_study_matches_the_snapshot(smoke_study: Path) -> None:
    from batchsize_study.experiments import run

    run(make_cfg(smoke_study, "experiment=compare"))
    got = snapshot(smoke_study)
    if os.environ.get("BATCHSIZE_STUDY_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"snapshot written to {GOLDEN}")
    assert GOLDEN.exists(), "no snapshot: run with BATCHSIZE_STUDY_UPDATE_GOLDEN=1 once"
    _assert_same(got, json.loads(GOLDEN.read_text()))
