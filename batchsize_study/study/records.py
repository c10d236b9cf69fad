"""A study's records on disk: written atomically, read defensively, one envelope for every kind.

Every record a stage writes (a training run's result.json, a sweep's or probe's summary, a
test-set evaluation) goes through :func:`write_record`, which refuses a record missing a field of
:data:`ENVELOPE` and stamps the package version and the time it was written: the selection
(:mod:`batchsize_study.study.select`) and the report rely on those fields being there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from batchsize_study import __version__
from batchsize_study.stats import json_safe

log = logging.getLogger("batchsize_study.study")

RECORD = "result.json"
EVALUATION = "evaluate"
"""The experiment name of a test-set evaluation record (batchsize_study.evaluate)."""
EVALUATION_LOSSES = "per_window_losses.npz"
"""Beside an evaluation record: every model's per-window test losses."""
FINAL_STATUSES = ("completed", "diverged", "no_divergence")
ENVELOPE = (
    "experiment",
    "status",
    "run_id",
    "study",
    "seed",
    "batch_size",
    "compat_key",
    "config_hash",
    "package_version",
    "finished_at",
)
"""The fields every record carries, whatever its kind: what it is, which run, which study,
which model/data configuration (``compat_key``) and settings (``config_hash``), which code."""


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder: a reader sees the old file
    or the new one, never a torn one, even across a power loss."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """A record, written with :func:`write_bytes_atomic` (NaN and infinities as null: valid JSON)."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=True, default=str) + "\n"
    write_bytes_atomic(path, text.encode())


def runs_dir(study_dir: str | os.PathLike) -> Path:
    return Path(study_dir) / "runs"


def read_records(
    study_dir: str | os.PathLike, experiment: str | None = None
) -> list[dict[str, Any]]:
    """Every readable result.json of the study (each with ``_path``), oldest first.
    A torn or foreign file is skipped with a warning, never trusted."""
    out = []
    for p in sorted(runs_dir(study_dir).glob(f"*/{RECORD}")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable record %s (%s)", p, exc)
            continue
        if not isinstance(rec, dict) or "experiment" not in rec:
            log.warning("skipping %s: not a batchsize_study record", p)
            continue
        if experiment is None or rec.get("experiment") == experiment:
            rec["_path"] = str(p)
            out.append(rec)
    out.sort(key=lambda r: (r.get("finished_at") or 0, r["_path"]))
    return out


def stable_hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def make_run_id(task: str, batch_size: int, seed: int, config_hash: str) -> str:
    """Unique per experiment, batch size, seed and configuration: sweeps never collide, and the
    same command maps to the same folder (so it can be resumed or reported)."""
    return f"{task}-bs{batch_size}-seed{seed}-{config_hash}"


def write_record(path: str | os.PathLike, rec: dict[str, Any]) -> dict[str, Any]:
    """Write a record of any kind in the one envelope; returns what was written (with ``_path``).

    ``package_version`` and ``finished_at`` are stamped here; every other field of
    :data:`ENVELOPE` must be given (``seed``/``batch_size`` may be None for kinds without one)."""
    rec = {k: v for k, v in rec.items() if k != "_path"}
    rec.setdefault("package_version", __version__)
    rec["finished_at"] = time.time()
    missing = [k for k in ENVELOPE if k not in rec]
    if missing:
        raise ValueError(f"record {path}: missing envelope fields {missing}")
    write_json_atomic(path, rec)
    rec["_path"] = str(path)
    return rec


def run_name(rec: dict[str, Any]) -> str:
    """A record's run id (its folder's name for records written before run_id existed)."""
    return str(rec.get("run_id") or Path(rec.get("_path", "?")).parent.name)


def beside(rec: dict[str, Any], name: str) -> Path:
    """A file in the record's own run folder: a moved or copied study reads its own files,
    never the absolute paths recorded when it was written."""
    return Path(rec["_path"]).with_name(name)


def existing_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path`` when it holds a final status (a finished run is reported, not
    redone); None otherwise."""
    if not path.exists():
        return None
    recs = [r for r in read_records(path.parent.parent.parent) if r["_path"] == str(path)]
    if recs and recs[0].get("status") in FINAL_STATUSES:
        return recs[0]
    return None
