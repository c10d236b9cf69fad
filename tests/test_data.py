"""Corpus sources, split, tokenizer cache, windows and the seeded order."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from batchsize_study.config import DataConfig, TokenizerConfig
from batchsize_study.data import (
    Document,
    SeededWindowSampler,
    TokenWindows,
    prepare_corpus,
    source_fingerprint,
    split_documents,
)
from batchsize_study.errors import DataError, UserError


def small_cfg(tmp_path: Path, **kw) -> DataConfig:
    base = dict(
        max_documents=60,
        tokenizer=TokenizerConfig(vocab_size=300),
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return DataConfig(**base)


def test_stdlib_corpus_decodes_invalid_utf8_with_replacement(tmp_path):
    # The stdlib ships deliberately undecodable files; a text corpus with one must not crash either.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bad.txt").write_bytes(b"caf\xe9 \xff\xfe latin-1 bytes " * 50)
    (tmp_path / "docs" / "good.txt").write_text("hello world " * 200)
    (tmp_path / "docs" / "more.txt").write_text("def f(x):\n    return x\n" * 200)
    (tmp_path / "docs" / "four.txt").write_text("class A:\n    pass\n" * 200)
    c = prepare_corpus(small_cfg(tmp_path, source="text", path=str(tmp_path / "docs")), seq_len=8)
    assert c.train_tokens > 0 and c.val_tokens > 0 and c.dtype == "uint16"


def test_split_is_by_document_and_deterministic():
    docs = [Document(f"f{i}.py", f"text {i}") for i in range(500)]
    tr1, va1, te1 = split_documents(docs, 0.1, 0.2)
    tr2, va2, te2 = split_documents(list(reversed(docs)), 0.1, 0.2)
    assert {d.name for d in va1} == {d.name for d in va2}
    assert {d.name for d in te1} == {d.name for d in te2}
    names = [{d.name for d in part} for part in (tr1, va1, te1)]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert sum(map(len, names)) == 500
    assert 20 < len(va1) < 80 and 60 < len(te1) < 140
    # The validation documents do not depend on the test fraction (the hash interval is cut
    # [0, val) -> val, [val, val + test) -> test).
    assert {d.name for d in split_documents(docs, 0.1, 0.05)[1]} == names[1]


def test_three_documents_give_three_splits():
    docs = [Document(n, "text " * 10) for n in ("a", "b", "c")]
    train, val, test = split_documents(docs, 0.01, 0.01)
    assert (len(train), len(val), len(test)) == (1, 1, 1)


def test_default_corpus_split_plan_moves_nothing_and_reads_a_prefix():
    """Issue 19: the split is planned before the tokenizer's sample; on a corpus whose splits
    the hash fills (the default) the plan moves nothing, so its sample and tokens are as before,
    and it stops reading once every split has a document."""
    from batchsize_study.data.prepare import _plan_splits

    cfg = DataConfig()
    _, source = source_fingerprint(cfg)
    plan = _plan_splits(cfg, source)
    assert plan.moves == {} and plan.seen is None


def test_test_split_is_written_and_kept_apart(tmp_path):
    c = prepare_corpus(small_cfg(tmp_path, max_documents=80), seq_len=16)
    assert c.test_documents >= 1 and c.test_tokens > 0
    assert os.path.getsize(c.test_path) == c.test_tokens * np.dtype(c.dtype).itemsize
    assert c.train_documents + c.val_documents + c.test_documents <= 80
    meta = json.loads((Path(c.dir) / "meta.json").read_text())
    assert meta["corpus"]["test_tokens"] == c.test_tokens


def test_cache_is_reused_and_keyed_by_settings(tmp_path):
    cfg = small_cfg(tmp_path)
    a = prepare_corpus(cfg, seq_len=16)
    mtime = os.path.getmtime(a.train_path)
    b = prepare_corpus(cfg, seq_len=16)
    assert a == b and os.path.getmtime(b.train_path) == mtime
    c = prepare_corpus(small_cfg(tmp_path, tokenizer=TokenizerConfig(vocab_size=320)), seq_len=16)
    assert c.fingerprint != a.fingerprint and c.vocab_size == 320
    meta = json.loads((Path(a.dir) / "meta.json").read_text())
    assert meta["corpus"]["train_tokens"] == os.path.getsize(a.train_path) // 2


def _prepare(args):
    cfg, seq_len = args
    return prepare_corpus(cfg, seq_len).fingerprint


def test_two_processes_preparing_at_once_share_one_cache(tmp_path):
    cfg = small_cfg(tmp_path, max_documents=80)
    with mp.get_context("spawn").Pool(2) as pool:
        fps = pool.map(_prepare, [(cfg, 16), (cfg, 16)])
    assert fps[0] == fps[1]
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len([e for e in entries if not e.endswith(".lock")]) == 1, (
        entries
    )  # no stray temp folders


def test_text_source_file_folder_and_glob(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(6):
        (d / "sub" / f"{i}.txt").write_text(f"document number {i} " * 100)
    fp_folder, (root, files) = source_fingerprint(
        DataConfig(source="text", path=str(d), glob="**/*.txt")
    )
    assert len(files) == 6
    _, (_, files) = source_fingerprint(DataConfig(source="text", path=str(d / "sub" / "*.txt")))
    assert len(files) == 6
    _, (_, files) = source_fingerprint(DataConfig(source="text", path=str(d / "sub" / "0.txt")))
    assert len(files) == 1
    with pytest.raises(UserError) as e:  # checked when the settings are built, before any work
        source_fingerprint(DataConfig(source="text", path="/nonexistent/corpus"))
    assert "data.path='/nonexistent/corpus'" in str(e.value)
    with pytest.raises(DataError) as e:  # a glob is checked when it is expanded
        source_fingerprint(DataConfig(source="text", path="/nonexistent/*.txt"))
    assert "data.path='/nonexistent/*.txt'" in str(e.value)


def test_hub_source_with_a_local_stand_in(tmp_path):
    """A folder laid out like a hub dataset repo (data/train-*.parquet), loaded by datasets."""
    import datasets

    repo = tmp_path / "hub_repo"
    (repo / "data").mkdir(parents=True)
    texts = [f"story {i}: " + "once upon a time " * (20 + i % 7) for i in range(120)]
    datasets.Dataset.from_dict({"text": texts, "id": list(range(120))}).to_parquet(
        str(repo / "data" / "train-00000-of-00001.parquet")
    )
    cfg = small_cfg(tmp_path, source="hub", name=str(repo), max_documents=None)
    c = prepare_corpus(cfg, seq_len=16)
    assert c.train_documents + c.val_documents + c.test_documents == 120
    with pytest.raises(DataError) as e:
        prepare_corpus(
            small_cfg(tmp_path, source="hub", name=str(repo), text_field="body"), seq_len=16
        )
    assert "data.text_field='body'" in str(e.value)


def test_windows_are_seq_len_plus_one_and_cover_the_file(tmp_path):
    path = tmp_path / "tok.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    ds = TokenWindows(str(path), "uint16", seq_len=10)
    assert len(ds) == 99
    w = ds[3]
    assert w.tolist() == list(range(30, 41))
    assert ds[len(ds) - 1][-1].item() <= 999


def test_sampler_is_seeded_and_ranks_are_disjoint():
    a = list(SeededWindowSampler(50, seed=1, num_samples=120))
    assert a == list(SeededWindowSampler(50, seed=1, num_samples=120))
    assert a != list(SeededWindowSampler(50, seed=2, num_samples=120))
    assert sorted(a[:50]) == list(range(50))  # each epoch is a permutation
    r0 = list(SeededWindowSampler(50, seed=1, num_samples=60, rank=0, world=2))
    r1 = list(SeededWindowSampler(50, seed=1, num_samples=60, rank=1, world=2))
    # Two ranks together see exactly the single-device stream (same effective batch, same data).
    merged = [x for pair in zip(r0, r1) for x in pair]
    assert merged == a
    resumed = list(SeededWindowSampler(50, seed=1, num_samples=120, start=70))
    assert resumed == a[70:]
