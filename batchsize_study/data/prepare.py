"""The token cache: documents -> train/val/test token files, in bounded memory.

Two passes over the corpus, each a stream:

1. **tokenizer**: byte-level BPE trained on a bounded sample of the training split
   (``data.tokenizer.train_sample_mb``): BPE keeps word counts, so its memory follows the sample,
   not the corpus. The split is final before the sample is drawn (:func:`_plan_splits`): the
   tokenizer never learns from a validation or test document (issue 19).
2. **encode**: documents go out in chunks of about ``ENCODE_CHUNK_CHARS`` characters to a pool
   of worker processes (one per core, ``data.num_proc``), at most two chunks per worker in
   flight; results come back in order and are appended to ``train.bin``/``val.bin``/``test.bin``
   as they arrive, each file hashed as it is written. The order (and so every token) does not
   depend on the number of workers.

Preparation runs once per fingerprint of corpus + tokenizer + settings, under a file lock, in a
temporary folder published with one atomic rename: two runs that start together never see half a
cache, and a failed build leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from batchsize_study.config import DataConfig
from batchsize_study.data.encode import (
    TokenizerLoadError,
    encode_in_worker,
    encode_texts,
    eos_id,
    init_worker,
    load_pretrained_tokenizer,
    train_bpe,
)
from batchsize_study.data.sources import (
    Document,
    Source,
    iter_documents,
    python_version,
    source_fingerprint,
)
from batchsize_study.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # 4: streamed build, blocks, budget, token hash; 3: test split; 2: long runs
ENCODE_CHUNK_CHARS = 250_000
"""Characters per encode task (a longer document is a task alone): big enough that a task's
fixed cost (pickling, one ``encode_batch_fast`` call) is small against its ~0.1-0.3 s of
encoding, small enough that a worker's peak stays near its ~40 MB start (encoding takes ~45 MB
per million characters)."""
CHARS_PER_TOKEN_CAP = 4
"""With a token budget, the tokenizer sample is capped at this many characters per budgeted
token, so a small budget does not read a large sample (BPE on text runs at 3-5 chars/token)."""
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PreparedCorpus:
    """A prepared token cache: what the model, the data module and the records need to know."""

    dir: str
    fingerprint: str
    vocab_size: int
    dtype: str
    eos_id: int | None
    train_tokens: int
    val_tokens: int
    test_tokens: int
    train_documents: int
    val_documents: int
    test_documents: int
    token_hash: str
    """sha256 over the three token files' sha256s: same hash, same tokens, whatever the machine."""
    python_version: str | None = None
    """data.source=stdlib: the Python whose standard library the corpus is (another Python gives
    another corpus, other tokens and other figures)."""
    complete: bool = True
    """False when data.max_tokens stopped reading before the corpus ended."""

    @property
    def train_path(self) -> str:
        return os.path.join(self.dir, "train.bin")

    @property
    def val_path(self) -> str:
        return os.path.join(self.dir, "val.bin")

    @property
    def test_path(self) -> str:
        """Held out by document hash: training and validation never read it (issue 11)."""
        return os.path.join(self.dir, "test.bin")

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.dir, "tokenizer.json")


# ---------------------------------------------------------------- the split


def _unit(name: str, salt: str = "") -> float:
    digest = hashlib.sha256((salt + name).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(name: str, val_fraction: float, test_fraction: float) -> str:
    """train, val or test, by a hash of the document's name: stable across machines, runs and
    corpus growth. The hash's unit interval is cut [0, val) -> val, [val, val+test) -> test, so
    the validation documents are the same whatever test_fraction is."""
    u = _unit(name)
    if u < val_fraction:
        return "val"
    return "test" if u < val_fraction + test_fraction else "train"


def split_documents(
    docs: list[Document], val_fraction: float, test_fraction: float
) -> tuple[list[Document], list[Document], list[Document]]:
    """The split of a list, with the same fallback as a build: with three or more documents, a
    split the hash left empty takes the last document of another (:func:`_empty_split_moves`)."""
    docs = [d for d in docs if d.text and not d.text.isspace()]
    parts: dict[str, list[Document]] = {"train": [], "val": [], "test": []}
    for d in docs:
        parts[split_of(d.name, val_fraction, test_fraction)].append(d)
    if len(docs) >= 3:
        for donor, receiver in _empty_split_moves({k: len(v) for k, v in parts.items()}):
            parts[receiver].append(parts[donor].pop())
    return parts["train"], parts["val"], parts["test"]


def _empty_split_moves(counts: dict[str, int]) -> list[tuple[str, str]]:
    """(donor, receiver) moves that give each split the hash left empty the *last* document of a
    split with two or more (training first, then the larger of the others); call with three or
    more documents. Shared by split_documents and the streaming writer, which holds back each
    split's last two documents for this (at most two splits are empty, so a donor gives at most
    two, and only a split with three or more gives twice)."""
    counts = dict(counts)
    moves = []
    for split in ("val", "test", "train"):
        if counts[split]:
            continue
        if split != "train" and counts["train"] > 1:
            donor = "train"
        else:
            donor = max((s for s in SPLITS if s != split), key=counts.__getitem__)
        counts[donor] -= 1
        counts[split] += 1
        moves.append((donor, split))
    return moves


@dataclass(frozen=True)
class _SplitPlan:
    """The final split of every document, known before the tokenizer's sample is drawn."""

    moves: dict[str, str]
    """name -> split, for the documents that a split the hash left empty takes; every other
    document stays in its hash split."""
    seen: int | None = None
    """Documents read, when the whole corpus was (None: the plan stopped early, no move)."""
    nonempty: int | None = None

    def split(self, name: str, cfg: DataConfig) -> str:
        """The document's final split: what the writer will put it in."""
        return self.moves.get(name) or split_of(name, cfg.val_fraction, cfg.test_fraction)


def _plan_splits(cfg: DataConfig, source: Source) -> _SplitPlan:
    """The writer's fallback (:func:`_empty_split_moves`, on each split's last documents) played
    ahead of the build, so that the tokenizer's sample can leave out a training document that
    validation or test will take, and draw from one that train will take.

    Stops reading as soon as every split has a non-empty document: then nothing moves (the
    default corpus reads a few dozen files). Only a corpus with a split the hash left empty is
    read to its end. A token budget can stop the writer earlier; :func:`_build_cache` checks
    the sample against where the writer put each document.
    """
    counts = dict.fromkeys(SPLITS, 0)
    last: dict[str, deque[str]] = {s: deque() for s in SPLITS}
    seen = nonempty = 0
    for d in iter_documents(cfg, source):
        seen += 1
        if not d.text or d.text.isspace():
            continue
        split = split_of(d.name, cfg.val_fraction, cfg.test_fraction)
        nonempty += 1
        counts[split] += 1
        if all(counts.values()):
            return _SplitPlan({})
        last[split].append(d.name)
        if len(last[split]) > 2:
            last[split].popleft()
    moves: dict[str, str] = {}
    if nonempty >= 3:
        for donor, receiver in _empty_split_moves(counts):
            name = last[donor].pop()
            last[receiver].append(name)
            moves[name] = receiver
    return _SplitPlan(moves, seen=seen, nonempty=nonempty)


# ---------------------------------------------------------------- cache key


def _settings_key(cfg: DataConfig, max_tokens: int | None) -> dict:
    """Everything that decides the tokens (and nothing that does not, like data.num_proc)."""
    key = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "glob": cfg.glob,
        "max_documents": cfg.max_documents,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "text_field": cfg.text_field,
        "block_chars": cfg.block_chars,
        "long_document_chars": cfg.long_document_chars,
        "max_tokens": max_tokens,
        "streaming": cfg.streaming,
        "tokenizer": asdict(cfg.tokenizer)
        if not isinstance(cfg.tokenizer, dict)
        else cfg.tokenizer,
    }
    if cfg.source == "stdlib":
        key["python"] = python_version()
    return key


def cache_dir(cfg: DataConfig) -> str:
    """data.cache_dir, else $BATCHSIZE_STUDY_CACHE, else ~/.cache/batchsize_study."""
    return cfg.cache_dir or os.environ.get("BATCHSIZE_STUDY_CACHE") or "~/.cache/batchsize_study"


def _describe(cfg: DataConfig) -> str:
    if cfg.source == "stdlib":
        return "data.source=stdlib"
    return f"data.path={cfg.path!r}" if cfg.source == "text" else f"data.name={cfg.name!r}"


# ---------------------------------------------------------------- entry point


def prepare_corpus(cfg: DataConfig, seq_len: int, max_tokens: int | None = None) -> PreparedCorpus:
    """Tokenize the corpus once per fingerprint (under a lock) and return the cache's description.

    ``max_tokens``: the caller's token budget (all three splits together), used when
    ``data.max_tokens`` is null; null in both reads the whole corpus. Runs of one study should
    pass one number (the largest run's need) so they share one cache.

    Safe to call from several processes at once: the first builds, the others wait and reuse.
    """
    t0 = time.perf_counter()
    budget = cfg.max_tokens if cfg.max_tokens is not None else max_tokens
    src_fp, source = source_fingerprint(cfg)
    fp = hashlib.sha256(
        (src_fp + json.dumps(_settings_key(cfg, budget), sort_keys=True)).encode()
    ).hexdigest()
    cache_root = Path(os.path.expanduser(cache_dir(cfg)))
    made_root = not cache_root.exists()
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"data.cache_dir={cfg.cache_dir!r}: cannot create it ({exc.strerror}); choose a writable folder"
        ) from None
    final = cache_root / f"corpus-{fp[:20]}"
    lock_path = str(final) + ".lock"
    try:
        with FileLock(lock_path, timeout=3600):
            if not (final / "meta.json").exists():
                _build_cache(cfg, source, final, fp, budget, seq_len)
    except BaseException:
        if not final.exists():  # nothing published: leave no trace of the attempt
            _remove_quietly(lock_path)
            if made_root:
                _rmdir_quietly(cache_root)
        raise
    meta = json.loads((final / "meta.json").read_text())
    prepared = PreparedCorpus(dir=str(final), **meta["corpus"])
    _check_windows(cfg, prepared, seq_len)
    log.info(
        "corpus %s: %s train / %s val / %s test tokens, vocab %d, token hash %s (%.1fs)",
        fp[:12],
        f"{prepared.train_tokens:,}",
        f"{prepared.val_tokens:,}",
        f"{prepared.test_tokens:,}",
        prepared.vocab_size,
        prepared.token_hash[:12],
        time.perf_counter() - t0,
    )
    return prepared


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()  # only if empty


# ---------------------------------------------------------------- build


def _build_cache(
    cfg: DataConfig, source: Source, final: Path, fp: str, budget: int | None, seq_len: int
) -> None:
    """Split plan, tokenizer, encode, publish: the plan comes first so that the tokenizer's
    sample holds only documents whose final split is train (issue 19)."""
    t0 = time.perf_counter()
    plan = _plan_splits(cfg, source) if cfg.tokenizer.kind == "bpe" else None
    if plan is not None and plan.seen is not None:
        _check_documents(cfg, plan.seen, plan.nonempty or 0, [])  # fail before training BPE
    excluded: set[str] = set()
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    while True:
        t1 = time.perf_counter()
        sampled: set[str] = set()
        if plan is not None:
            texts = _sample_texts(cfg, source, budget, plan, excluded, sampled)
            tok = train_bpe(texts, cfg.tokenizer.vocab_size)
        else:
            tok = _pretrained(cfg)
        t_tok = time.perf_counter() - t1
        vocab = tok.get_vocab_size()
        dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
        eos = eos_id(tok)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            tok.save(str(tmp / "tokenizer.json"))
            written = _encode_corpus(cfg, source, tok, eos, dtype, tmp, budget, watch=sampled)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        leaked = {n for n, s in written.placed.items() if s != "train"}
        if not leaked:
            break
        # Only under a token budget: the writer stopped before every split had a document, and
        # a split left empty took one the sample held (the plan read past the budget). Train
        # again without it; each round leaves out at least one more, so this ends.
        shutil.rmtree(tmp, ignore_errors=True)
        excluded |= leaked
        log.warning(
            "%s: the budget left a split empty; %d sampled document(s) moved out of the "
            "training split, training the tokenizer again without them",
            _describe(cfg),
            len(leaked),
        )
    try:
        _check_documents(
            cfg, written.seen, written.nonempty, [s for s in SPLITS if not written.documents[s]]
        )
        file_hashes = {s: written.hashes[s].hexdigest() for s in SPLITS}
        token_hash = hashlib.sha256(
            "".join(f"{s}:{file_hashes[s]}\n" for s in SPLITS).encode()
        ).hexdigest()
        meta = {
            "corpus": {
                "fingerprint": fp,
                "vocab_size": vocab,
                "dtype": dtype.name,
                "eos_id": eos,
                **{f"{s}_tokens": written.tokens[s] for s in SPLITS},
                **{f"{s}_documents": written.documents[s] for s in SPLITS},
                "token_hash": token_hash,
                "python_version": python_version() if cfg.source == "stdlib" else None,
                "complete": not written.stopped,
            },
            "token_files": {f"{s}.bin": file_hashes[s] for s in SPLITS},
            "settings": _settings_key(cfg, budget),
            "read": {
                "documents": written.seen,
                "characters": written.chars,
                "stopped_by_max_tokens": written.stopped,
            },
            "seconds": {
                "tokenizer": round(t_tok, 2),
                "total": round(time.perf_counter() - t0, 2),
            },
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, final)  # publish atomically: meta.json appears with everything else
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared corpus in %.1fs -> %s", time.perf_counter() - t0, final)


def _pretrained(cfg: DataConfig):  # noqa: ANN202 - tokenizers.Tokenizer
    """data.tokenizer.kind=pretrained: a load failure becomes a DataError that says what to do."""
    try:
        return load_pretrained_tokenizer(str(cfg.tokenizer.name))
    except TokenizerLoadError as exc:
        raise DataError(
            f"data.tokenizer.name={cfg.tokenizer.name!r}: could not load it ({exc}); give a "
            "local tokenizer.json (or its folder), or a hub id that is cached, or use "
            "data.tokenizer.kind=bpe"
        ) from None


def _check_documents(cfg: DataConfig, seen: int, nonempty: int, empty: list[str]) -> None:
    """Refuse a corpus that cannot give three non-empty splits."""
    if not nonempty:
        raise DataError(
            f"{_describe(cfg)}: the corpus has no non-empty documents "
            f"({seen} document(s), all empty or whitespace); point it at text"
        )
    if empty or nonempty < 3:
        raise DataError(
            f"{_describe(cfg)}: {nonempty} non-empty document(s) cannot give train, "
            f"validation and test splits; give at least three documents (files or rows), or "
            f"cut a long text into more blocks with a smaller data.block_chars={cfg.block_chars}"
        )


def _sample_texts(
    cfg: DataConfig,
    source: Source,
    budget: int | None,
    plan: _SplitPlan,
    excluded: set[str],
    sampled: set[str],
) -> Iterator[str]:
    """The tokenizer's training text: documents whose *final* split is train (``plan``; none in
    ``excluded``), at most train_sample_mb; their names are added to ``sampled``.

    Where the corpus size is known (files) documents are drawn by a second hash of their name
    with the probability that makes the expected sample the cap, so the sample spans the
    corpus; a stream (hub), or a corpus read only up to a token budget, gives its first
    documents. Files that are not drawn are not read. When the draw takes nothing (a training
    split of a document or two), every training document may be taken.
    """
    cap = int(cfg.tokenizer.train_sample_mb * 1e6)
    if budget is not None:
        cap = min(cap, CHARS_PER_TOKEN_CAP * budget)
    keep = 1.0
    if source.total_bytes and budget is None:
        train_bytes = source.total_bytes * (1 - cfg.val_fraction - cfg.test_fraction)
        keep = min(1.0, cap / max(train_bytes, 1.0))
    taken = 0
    for draw in (keep, 1.0) if keep < 1.0 else (keep,):

        def skip(name: str, draw: float = draw) -> bool:
            return (
                plan.split(name, cfg) != "train"
                or name in excluded
                or _unit(name, "sample|") >= draw
            )

        for doc in iter_documents(cfg, source, skip=skip):
            if not doc.text or skip(doc.name):
                continue
            sampled.add(doc.name)
            yield doc.text
            taken += len(doc.text)
            if taken >= cap:
                return
        if taken:
            return
    log.warning("%s: no training document for the tokenizer to learn from", _describe(cfg))


# ---------------------------------------------------------------- encode


@dataclass
class _Written:
    tokens: dict[str, int]
    documents: dict[str, int]
    hashes: dict[str, Any]
    seen: int = 0
    nonempty: int = 0
    chars: int = 0
    stopped: bool = False
    placed: dict[str, str] = field(default_factory=dict)
    """Where each watched document (the tokenizer's sample) was written."""


class _SplitWriter:
    """Appends each document's tokens to its split's file, holding back the last two documents of
    every split, so that a split the hash left empty can take one at the end (the fallback of
    split_documents, :func:`_empty_split_moves`)."""

    def __init__(self, folder: Path, budget: int | None, watch: set[str] | None = None) -> None:
        self.fh = {s: open(folder / f"{s}.bin", "wb") for s in SPLITS}  # noqa: SIM115
        self.w = _Written(
            tokens=dict.fromkeys(SPLITS, 0),
            documents=dict.fromkeys(SPLITS, 0),
            hashes={s: hashlib.sha256() for s in SPLITS},
        )
        self.held: dict[str, deque[tuple[str, np.ndarray]]] = {s: deque() for s in SPLITS}
        self.budget = budget
        self.total = 0
        self.watch = watch or set()

    def _write(self, split: str, name: str, arr: np.ndarray) -> None:
        data = arr.tobytes()
        self.fh[split].write(data)
        self.w.hashes[split].update(data)
        self.w.tokens[split] += int(arr.size)
        self.w.documents[split] += 1
        if name in self.watch:
            self.w.placed[name] = split

    def add(self, name: str, split: str, arr: np.ndarray) -> bool:
        """Route one document; False once the budget is reached (stop reading)."""
        self.w.nonempty += 1
        held = self.held[split]
        held.append((name, arr))
        if len(held) > 2:
            self._write(split, *held.popleft())
        self.total += int(arr.size)
        if self.budget is not None and self.total >= self.budget:
            self.w.stopped = True
            return False
        return True

    def close(self) -> _Written:
        if self.w.nonempty >= 3:
            counts = {s: self.w.documents[s] + len(self.held[s]) for s in SPLITS}
            for donor, receiver in _empty_split_moves(counts):
                self.held[receiver].append(self.held[donor].pop())
        for s in SPLITS:
            while self.held[s]:
                self._write(s, *self.held[s].popleft())
        for fh in self.fh.values():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        return self.w


def _chunks(
    cfg: DataConfig, docs: Iterator[Document], w: _Written, chunk_chars: int
) -> Iterator[tuple[list[tuple[str, str]], list[str]]]:
    """((name, split) pairs, texts) of consecutive non-empty documents, about chunk_chars each."""
    splits: list[tuple[str, str]] = []
    texts: list[str] = []
    size = 0
    for d in docs:
        w.seen += 1
        if not d.text or d.text.isspace():
            continue
        if texts and size + len(d.text) > chunk_chars:
            yield splits, texts
            splits, texts, size = [], [], 0
        splits.append((d.name, split_of(d.name, cfg.val_fraction, cfg.test_fraction)))
        texts.append(d.text)
        size += len(d.text)
        if size >= chunk_chars:
            yield splits, texts
            splits, texts, size = [], [], 0
    if texts:
        yield splits, texts


def num_processes(cfg: DataConfig) -> int:
    """data.num_proc, else the cores this process may use."""
    if cfg.num_proc is not None:
        return cfg.num_proc
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _encode_corpus(
    cfg: DataConfig,
    source: Source,
    tok,  # noqa: ANN001 - tokenizers.Tokenizer
    eos: int | None,
    dtype: np.dtype,
    folder: Path,
    budget: int | None,
    watch: set[str] | None = None,
) -> _Written:
    writer = _SplitWriter(folder, budget, watch)
    progress = _Progress(source.total_bytes, budget is None)
    procs = num_processes(cfg)
    small = source.total_bytes is not None and source.total_bytes < 4 * ENCODE_CHUNK_CHARS
    if budget is not None:
        small = small or CHARS_PER_TOKEN_CAP * budget < 4 * ENCODE_CHUNK_CHARS
    # A daemonic process (a worker of someone else's pool) may not start one of its own, and a
    # spawned child re-applies its parent's start method, which fails for one that only a
    # launcher knows (joblib's loky workers set "loky"): encode in this process there.
    foreign = mp.get_start_method(allow_none=True) not in (None, "fork", "spawn", "forkserver")
    in_process = procs <= 1 or small or mp.current_process().daemon or foreign
    in_flight = (1 if procs <= 1 else min(procs, 4)) if in_process else 2 * procs
    chunk_chars = ENCODE_CHUNK_CHARS
    if budget is not None:  # read at most ~25 % past the budget: chunks in flight are read
        chunk_chars = min(chunk_chars, max(4096, CHARS_PER_TOKEN_CAP * budget // (4 * in_flight)))
    chunks = _chunks(cfg, iter_documents(cfg, source), writer.w, chunk_chars)
    pool = None
    try:
        if in_process:
            # In this process; tokenizers' own threads parallelise each batch.
            results: Iterator = (
                (s, t, encode_texts(tok, t, eos, dtype)) for s, t in _batched(chunks, in_flight)
            )
        else:
            # A process pool that fails loudly (BrokenProcessPool) when a worker dies, where
            # multiprocessing.Pool would wait for the lost task forever. Spawned workers import
            # the caller's main module: a script calling this needs the usual
            # `if __name__ == "__main__":` guard (or data.num_proc=1).
            pool = ProcessPoolExecutor(
                procs,
                mp_context=mp.get_context("spawn"),
                initializer=init_worker,
                initargs=(tok.to_str(), eos, dtype.name),
            )
            results = _in_order(pool, chunks, dtype, in_flight=in_flight)
        for splits, texts, (tokens, lengths) in results:
            progress.update(sum(map(len, texts)), writer.total)
            writer.w.chars += sum(map(len, texts))
            if not _route(writer, splits, tokens, lengths):
                break
    except BrokenProcessPool:
        raise DataError(
            f"data.num_proc={cfg.num_proc}: an encode worker died (out of memory?); "
            "use fewer processes, e.g. data.num_proc=1"
        ) from None
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return writer.close()


def _batched(
    chunks: Iterator[tuple[list[tuple[str, str]], list[str]]], k: int
) -> Iterator[tuple[list[tuple[str, str]], list[str]]]:
    """k chunks as one: in-process encode_batch_fast uses all cores only on big batches."""
    splits: list[tuple[str, str]] = []
    texts: list[str] = []
    for i, (s, t) in enumerate(chunks, 1):
        splits += s
        texts += t
        if i % k == 0:
            yield splits, texts
            splits, texts = [], []
    if texts:
        yield splits, texts


def _in_order(
    pool: ProcessPoolExecutor,
    chunks: Iterator[tuple[list[tuple[str, str]], list[str]]],
    dtype: np.dtype,
    in_flight: int,
) -> Iterator[tuple[list[tuple[str, str]], list[str], tuple[np.ndarray, np.ndarray]]]:
    """Results in submission order with at most ``in_flight`` chunks out (Executor.map and
    Pool.imap would read the whole corpus ahead into their queues)."""
    pending: deque = deque()
    for splits, texts in chunks:
        pending.append((splits, texts, pool.submit(encode_in_worker, texts)))
        if len(pending) >= in_flight:
            s, t, fut = pending.popleft()
            data, lengths = fut.result()
            yield s, t, (np.frombuffer(data, dtype=dtype), lengths)
    while pending:
        s, t, fut = pending.popleft()
        data, lengths = fut.result()
        yield s, t, (np.frombuffer(data, dtype=dtype), lengths)


def _route(
    writer: _SplitWriter, splits: list[tuple[str, str]], tokens: np.ndarray, lengths: np.ndarray
) -> bool:
    ends = np.cumsum(lengths)
    start = 0
    for (name, split), end in zip(splits, ends.tolist(), strict=True):
        if not writer.add(name, split, tokens[start:end]):
            return False
        start = end
    return True


class _Progress:
    """MB read, MB/s and time left: a tqdm bar on a terminal, a log line every 30 s elsewhere
    (batch jobs)."""

    def __init__(self, total_bytes: int | None, known_total: bool) -> None:
        from tqdm.auto import tqdm

        self.total_mb = total_bytes / 1e6 if total_bytes and known_total else None
        self.bar = tqdm(
            total=self.total_mb,
            unit="MB",
            desc="tokenizing corpus",
            disable=None,
            dynamic_ncols=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MB "
            "[{elapsed}<{remaining}, {rate_fmt}{postfix}]"
            if self.total_mb
            else None,
        )
        self.done = 0.0
        self.t0 = self.last = time.perf_counter()

    def update(self, chars: int, tokens: int) -> None:
        mb = chars / 1e6
        self.done += mb
        self.bar.update(mb)
        self.bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
        now = time.perf_counter()
        if self.bar.disable and now - self.last > 30:
            self.last = now
            rate = self.done / (now - self.t0)
            left = (
                f", ~{(self.total_mb - self.done) / rate:.0f}s left"
                if self.total_mb and rate
                else ""
            )
            log.info("tokenizing corpus: %.0f MB (%.1f MB/s%s)", self.done, rate, left)

    def close(self) -> None:
        self.bar.close()
        dt = time.perf_counter() - self.t0
        if self.done:
            log.info("tokenized %.1f MB in %.1fs (%.1f MB/s)", self.done, dt, self.done / dt)


# ---------------------------------------------------------------- checks


def _check_windows(cfg: DataConfig, c: PreparedCorpus, seq_len: int) -> None:
    if c.train_tokens < seq_len + 1:
        raise DataError(
            f"{_describe(cfg)}: the training split has {c.train_tokens} tokens, fewer than one window of "
            f"model.seq_len+1={seq_len + 1}; use a larger corpus or a smaller model.seq_len"
        )
    if c.val_tokens < seq_len + 1:
        raise DataError(
            f"data.val_fraction={cfg.val_fraction}: the validation split has {c.val_tokens} tokens, fewer "
            f"than one window of {seq_len + 1}; raise data.val_fraction or lower model.seq_len"
        )
    if c.test_tokens < seq_len + 1:
        raise DataError(
            f"data.test_fraction={cfg.test_fraction}: the test split has {c.test_tokens} tokens, fewer "
            f"than one window of {seq_len + 1}; raise data.test_fraction or lower model.seq_len"
        )
