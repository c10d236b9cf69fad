"""Bad input fails before training with one line naming the input and the fix (exit status 2),
leaving no run folder and no half-built cache; or it is handled in a documented way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_utils import REPO, cli, last_line

from batchsize_study.config import validate
from batchsize_study.data import MAX_RUN, prepare_corpus, split_long_runs
from batchsize_study.errors import UserError
from batchsize_study.experiments import run
from batchsize_study.study import read_records

SMALL = ("experiment=small_batch", "lr=0.003")
TEXT = "the quick brown fox jumps over the lazy dog and keeps running far away\n"


def _cache_root() -> Path:
    return Path(os.environ["BATCHSIZE_STUDY_CACHE"])


def _assert_nothing_half_written(study: Path) -> None:
    runs = study / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
    assert not list(_cache_root().glob("*.tmp-*")), "a half-built cache folder was left behind"


def _folder(tmp_path: Path, files: dict[str, bytes | str]) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        (d / name).write_bytes(data)
    return d


def _cli_refuses(study: Path, *overrides: str, names: str) -> str:
    res = cli(study, *overrides, timeout=180)
    assert res.returncode == 2, res.stderr[-3000:]
    line = last_line(res.stderr)
    assert line.startswith("error: ") and names in line, line
    _assert_nothing_half_written(study)
    return line


# ---------------------------------------------------------------- CLI: exit 2, one error: line


def test_cli_empty_corpus(tmp_path):
    corpus = _folder(tmp_path, {"a.txt": "", "b.txt": ""})
    line = _cli_refuses(
        tmp_path / "s", *SMALL, "data=text", f"data.path={corpus}", names="data.path="
    )
    assert "no non-empty documents" in line


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("lr=0", "lr=0.0: use a positive learning rate"),
        ("model=nope", "model=nope: no such option; use one of"),
        ("batch_size=abc", "batch_size:"),
    ],
)
def test_cli_bad_settings(tmp_path, override, names):
    _cli_refuses(tmp_path / "s", *SMALL, override, names=names)


def test_cli_hub_dataset_while_offline(tmp_path):
    line = _cli_refuses(
        tmp_path / "s", *SMALL, "data=hub", "data.name=nobody/no_such_dataset", names="data.name="
    )
    assert "could not load the dataset" in line


# ---------------------------------------------------------------- in process: same checks, faster


def _refused(cfg_factory, tmp_path, *overrides: str, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        run(cfg_factory(*overrides))
    assert "\n" not in str(info.value)
    _assert_nothing_half_written(tmp_path / "study")


def test_whitespace_only_corpus(cfg_factory, tmp_path):
    corpus = _folder(tmp_path, {"a.txt": "  \n\t\n", "b.txt": "\n\n   "})
    _refused(
        cfg_factory, tmp_path, *SMALL, "data=text", f"data.path={corpus}", match="no non-empty"
    )


def test_corpus_smaller_than_one_window(cfg_factory, tmp_path):
    corpus = _folder(tmp_path, {"a.txt": "tiny", "b.txt": "also tiny", "c.txt": "tiny too"})
    _refused(
        cfg_factory,
        tmp_path,
        *SMALL,
        "data=text",
        f"data.path={corpus}",
        match=r"training split has \d+ tokens, fewer than one window of model.seq_len\+1=33",
    )


def test_validation_split_without_a_window(cfg_factory, tmp_path):
    # Three documents: the split keeps one for validation (the last by name when none hashes
    # there) and one for test.
    corpus = _folder(tmp_path, {"a.txt": TEXT * 200, "b.txt": TEXT * 200, "z.txt": "short"})
    _refused(
        cfg_factory,
        tmp_path,
        *SMALL,
        "data=text",
        f"data.path={corpus}",
        match=r"data.val_fraction=0.02: the validation split has \d+ tokens",
    )


def test_bad_settings_in_process(cfg_factory, tmp_path):
    _refused(cfg_factory, tmp_path, *SMALL, "lr=-0.1", match=r"^lr=-0.1: use a positive")
    _refused(
        cfg_factory,
        tmp_path,
        *SMALL,
        "micro_batch_size=32",
        match=r"^micro_batch_size=32: must not exceed batch_size=16",
    )
    _refused(cfg_factory, tmp_path, *SMALL, "data=hub", match=r"^data.name=None: give data.name")
    _refused(cfg_factory, tmp_path, *SMALL, "data=text", match=r"^data.path=None: give data.path")
    _refused(
        cfg_factory,
        tmp_path,
        *SMALL,
        "data=text",
        f"data.path={tmp_path / 'nowhere'}",
        match="no such file, folder or matching glob",
    )


def test_non_utf8_files_are_decoded_with_replacement(cfg_factory, tmp_path):
    """Documented: bytes that are not UTF-8 become U+FFFD (as some stdlib test fixtures need)."""
    latin1 = ("café naïve résumé " * 300).encode("latin-1")
    binary = bytes(range(256)) * 20
    corpus = _folder(tmp_path, {"a.txt": latin1, "b.txt": TEXT * 100, "c.txt": binary})
    c = validate(cfg_factory("data=text", f"data.path={corpus}", "data.val_fraction=0.3"))
    prepared = prepare_corpus(c.data, c.model.seq_len)
    assert prepared.train_tokens > 1000
    assert prepared.train_documents + prepared.val_documents + prepared.test_documents == 3


def test_one_huge_line_without_whitespace(cfg_factory, tmp_path):
    """A 5 MB word is cut into MAX_RUN-character pieces before BPE: seconds, not minutes."""
    import random

    rng = random.Random(0)
    huge = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5_000_000))
    assert "".join(split_long_runs(huge)) == huge
    assert max(len(p) for p in split_long_runs(huge)) == MAX_RUN
    corpus = _folder(tmp_path, {"a.txt": huge, "b.txt": TEXT * 100, "c.txt": TEXT * 100})
    c = validate(cfg_factory("data=text", f"data.path={corpus}", "data.val_fraction=0.3"))
    t0 = time.perf_counter()
    prepared = prepare_corpus(c.data, c.model.seq_len)
    assert time.perf_counter() - t0 < 120
    assert prepared.train_tokens + prepared.val_tokens > 5_000_000 // 16


# ---------------------------------------------------------------- parallel writers


_WRITER = """
import json, sys
from batchsize_study.study import write_json_atomic
i, shared, own = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rec = {"experiment": "small_batch", "writer": i, "payload": "x" * 20000}
for k in range(30):
    write_json_atomic(shared, {**rec, "k": k})
write_json_atomic(own, rec)
"""


def test_twenty_concurrent_writers_leave_no_torn_or_lost_record(tmp_path):
    study = tmp_path / "study"
    shared = study / "runs" / "shared" / "result.json"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER,
                str(i),
                str(shared),
                str(study / "runs" / f"w{i}" / "result.json"),
            ],
            cwd=REPO,
        )
        for i in range(20)
    ]
    torn = 0
    while any(p.poll() is None for p in procs):  # read while they write
        if shared.exists():
            try:
                json.loads(shared.read_text())
            except ValueError:
                torn += 1
    assert [p.wait() for p in procs] == [0] * 20
    assert torn == 0
    recs = read_records(study)
    assert sorted(r["writer"] for r in recs if "w" in Path(r["_path"]).parent.name) == list(
        range(20)
    )
    assert json.loads(shared.read_text())["k"] == 29
    assert not list(study.glob("runs/*/.*.tmp"))


@pytest.mark.slow
def test_joblib_launcher_two_jobs_write_two_records(tmp_path):
    study = tmp_path / "study"
    res = cli(
        study,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "experiment=superconvergence",
        "seed=0,1",
        multirun=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    recs = read_records(study)
    assert sorted(r["seed"] for r in recs) == [0, 1]
    assert len({r["run_id"] for r in recs}) == 2
    assert all(r["status"] in ("diverged", "no_divergence") for r in recs)
