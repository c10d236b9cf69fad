"""Text in, packed token windows out.

corpus (stdlib | text files | hub dataset) -> documents -> deterministic train/val/test split
by document -> tokenizer (byte-level BPE trained on the train split, or a pretrained one) -> one
token file per split (uint16 where the vocabulary fits, as nanoGPT's prepare.py) -> windows of
``seq_len + 1`` tokens. Preparation runs once per fingerprint of corpus + tokenizer + settings,
under a file lock, and publishes its folder with one atomic rename, so two runs that start
together never see half a cache.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import re
import shutil
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, Sampler

from batchsize_study.config import DataConfig
from batchsize_study.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: a test split; 2: runs of non-whitespace longer than MAX_RUN are cut (see split_long_runs)
MAX_RUN = 512
_LONG_RUN = re.compile(rf"\S{{{MAX_RUN + 1},}}")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


@dataclass
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class PreparedCorpus:
    """A prepared token cache: what the model and the data module need to know about it."""

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


# ---------------------------------------------------------------- corpus sources


def stdlib_root() -> str:
    """The Python standard library's source folder: the corpus every Python machine has."""
    return sysconfig.get_paths()["stdlib"]


def _list_files(cfg: DataConfig) -> tuple[str, list[str]]:
    """(root, sorted file paths) of a file-based source; raises DataError when there are none."""
    if cfg.source == "stdlib":
        root = stdlib_root()
        files = [
            f
            for f in _glob_outside_packages(root, cfg.glob)
            if "site-packages" not in f and "dist-packages" not in f and os.path.isfile(f)
        ]
        where = f"data.source=stdlib ({root})"
    else:
        path = os.path.expanduser(str(cfg.path))
        if os.path.isfile(path):
            root, files = os.path.dirname(path), [path]
        elif os.path.isdir(path):
            root = path
            files = [
                f
                for f in globlib.glob(os.path.join(path, cfg.glob), recursive=True)
                if os.path.isfile(f)
            ]
            if not files and cfg.glob == "**/*.py":
                files = [
                    f
                    for f in globlib.glob(os.path.join(path, "**/*"), recursive=True)
                    if os.path.isfile(f)
                ]
        else:
            root = os.path.dirname(path.split("*")[0]) or "."
            files = [f for f in globlib.glob(path, recursive=True) if os.path.isfile(f)]
            if not files:
                raise DataError(
                    f"data.path={cfg.path!r}: no such file, folder or matching glob; "
                    "give an existing text file, a folder of them, or a glob such as 'corpus/*.txt'"
                )
        where = f"data.path={cfg.path!r}"
    files = sorted(files)
    if cfg.max_documents is not None:
        files = files[: cfg.max_documents]
    if not files:
        raise DataError(
            f"{where}: no files matched data.glob={cfg.glob!r}; change data.glob or the path"
        )
    return root, files


def _glob_outside_packages(root: str, pattern: str) -> list[str]:
    """glob(root/pattern) without walking site-packages: inside a pyenv/conda stdlib folder that
    tree holds every installed package (tens of thousands of files) and would dominate the
    cached start, which only needs to stat the corpus."""
    skip = ("site-packages", "dist-packages")
    if not pattern.startswith("**/"):
        return globlib.glob(os.path.join(root, pattern), recursive=True)
    rest = pattern[3:]
    found = globlib.glob(os.path.join(globlib.escape(root), rest))
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and entry.name not in skip:
            found += globlib.glob(
                os.path.join(globlib.escape(entry.path), "**", rest), recursive=True
            )
    return found


def _read_text(path: str) -> str:
    # Some stdlib files are deliberately not UTF-8 (test fixtures): decode with replacement.
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def _load_hub(cfg: DataConfig):  # noqa: ANN202 - datasets.Dataset
    import datasets

    name = os.path.expanduser(str(cfg.name))
    try:
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "state.json")):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=cfg.split, **dict(cfg.options))
    except Exception as exc:  # datasets raises many types (offline, missing, bad format)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"data.name={cfg.name!r}: could not load the dataset ({type(exc).__name__}: {first[:200]}); "
            "check the name and data.options, or download it first while online (HF_DATASETS_OFFLINE=1 "
            "uses the local cache), or use data=text with local files"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise DataError(
                f"data.split={cfg.split!r}: not in the dataset; choose one of {list(ds)}"
            )
        ds = ds[cfg.split]
    if cfg.text_field not in ds.column_names:
        raise DataError(
            f"data.text_field={cfg.text_field!r}: not a column of {cfg.name!r}; columns are {ds.column_names}"
        )
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


def source_fingerprint(cfg: DataConfig) -> tuple[str, object]:
    """A hash of the corpus as it is on disk now, and a handle to read it later.

    Files are hashed by (relative path, size, mtime) so a cached start does not read the corpus;
    hub datasets by their own content fingerprint.
    """
    h = hashlib.sha256()
    if cfg.source == "hub":
        ds = _load_hub(cfg)
        h.update(
            f"hub|{cfg.name}|{cfg.split}|{cfg.text_field}|{ds._fingerprint}|{len(ds)}".encode()
        )
        return h.hexdigest(), ds
    root, files = _list_files(cfg)
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest(), (root, files)


def iter_documents(cfg: DataConfig, handle: object) -> Iterator[Document]:
    if cfg.source == "hub":
        for i, text in enumerate(handle[cfg.text_field]):  # type: ignore[index]
            yield Document(f"{i:09d}", text or "")
        return
    root, files = handle  # type: ignore[misc]
    for f in files:
        yield Document(os.path.relpath(f, root), _read_text(f))


def split_of(name: str, val_fraction: float, test_fraction: float) -> str:
    """train, val or test, by a hash of the document's name: stable across machines, runs and
    corpus growth. The hash's unit interval is cut [0, val) -> val, [val, val+test) -> test, so
    the validation documents are the same whatever test_fraction is."""
    digest = hashlib.sha256(name.encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < val_fraction:
        return "val"
    return "test" if u < val_fraction + test_fraction else "train"


def split_documents(
    docs: list[Document], val_fraction: float, test_fraction: float
) -> tuple[list[Document], list[Document], list[Document]]:
    """Split by document; with three or more documents each split gets at least one (the last
    training documents move to validation, then to test, when the hash gave them none)."""
    docs = [d for d in docs if d.text.strip()]
    parts: dict[str, list[Document]] = {"train": [], "val": [], "test": []}
    for d in docs:
        parts[split_of(d.name, val_fraction, test_fraction)].append(d)
    train, val, test = parts["train"], parts["val"], parts["test"]
    if len(docs) >= 3:
        for held in (val, test):
            if not held:
                donor = train if len(train) > 1 else max((val, test), key=len)
                held.append(donor.pop())
        if not train:
            train.append((val if len(val) > 1 else test).pop(0))
    return train, val, test


# ---------------------------------------------------------------- tokenizer


def split_long_runs(text: str) -> list[str]:
    """Cut runs of more than MAX_RUN non-whitespace characters into MAX_RUN-sized pieces.

    Byte-level BPE pre-tokenizes on whitespace and character classes, so a 5 MB line without
    whitespace (minified JS, base64) is one "word", and BPE training and encoding on it take
    minutes and gigabytes. Pieces are tokenized separately and their ids concatenated: the text
    is unchanged, only no token spans a cut.
    """
    if len(text) <= MAX_RUN or not _LONG_RUN.search(text):
        return [text]
    out, pos = [], 0
    for m in _LONG_RUN.finditer(text):
        for cut in range(m.start() + MAX_RUN, m.end(), MAX_RUN):
            out.append(text[pos:cut])
            pos = cut
    out.append(text[pos:])
    return out


def train_bpe(texts: list[str], vocab_size: int):  # noqa: ANN201 - tokenizers.Tokenizer
    """Byte-level BPE (GPT-2 style) trained on the training split only: no unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    pieces = [p for t in texts for p in split_long_runs(t)]
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    return tok


def load_pretrained_tokenizer(name: str):  # noqa: ANN201
    from tokenizers import Tokenizer

    path = os.path.expanduser(name)
    try:
        if os.path.isfile(path):
            return Tokenizer.from_file(path)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
            return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        return Tokenizer.from_pretrained(name)
    except Exception as exc:
        raise DataError(
            f"data.tokenizer.name={name!r}: could not load it ({type(exc).__name__}); give a local "
            "tokenizer.json (or its folder), or a hub id that is cached, or use data.tokenizer.kind=bpe"
        ) from None


def _eos_id(tok) -> int | None:  # noqa: ANN001
    for cand in EOS_CANDIDATES:
        tid = tok.token_to_id(cand)
        if tid is not None:
            return tid
    return None


# ---------------------------------------------------------------- preparation


def _settings_key(cfg: DataConfig) -> dict:
    return {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "glob": cfg.glob,
        "max_documents": cfg.max_documents,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "text_field": cfg.text_field,
        "tokenizer": asdict(cfg.tokenizer)
        if not isinstance(cfg.tokenizer, dict)
        else cfg.tokenizer,
    }


ENCODE_CHUNK_CHARS = 8_000_000


def _chunks(docs: list[Document], max_chars: int) -> Iterator[list[Document]]:
    """Consecutive runs of documents of about ``max_chars`` characters each."""
    chunk: list[Document] = []
    size = 0
    for d in docs:
        chunk.append(d)
        size += len(d.text)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_to_file(
    tok, docs: list[Document], eos_id: int | None, path: str, dtype: np.dtype
) -> int:  # noqa: ANN001
    """Encode in large chunks and append to one flat token file.

    Chunks of ~8M characters: the Rust thread pool of ``encode_batch`` needs many documents per
    call to stay busy (256-document chunks ran 1.6x slower than one ``datasets.map`` baseline on
    the stdlib), while memory stays bounded. ``encode_batch_fast`` skips offsets we never use.
    """
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    n = 0
    with open(path, "wb") as fh:
        for docs_chunk in _chunks(docs, ENCODE_CHUNK_CHARS):
            chunk = [split_long_runs(d.text) for d in docs_chunk]
            encs = iter(encode([p for ps in chunk for p in ps], add_special_tokens=False))
            parts = []
            for ps in chunk:
                for _ in ps:
                    parts.append(np.asarray(next(encs).ids, dtype=dtype))
                if eos_id is not None:
                    parts.append(np.asarray([eos_id], dtype=dtype))
            if parts:
                arr = np.concatenate(parts)
                arr.tofile(fh)
                n += int(arr.size)
        fh.flush()
        os.fsync(fh.fileno())
    return n


def cache_dir(cfg: DataConfig) -> str:
    """data.cache_dir, else $BATCHSIZE_STUDY_CACHE, else ~/.cache/batchsize_study."""
    return cfg.cache_dir or os.environ.get("BATCHSIZE_STUDY_CACHE") or "~/.cache/batchsize_study"


def prepare_corpus(cfg: DataConfig, seq_len: int) -> PreparedCorpus:
    """Tokenize the corpus once per fingerprint (under a lock) and return the cache's description.

    Safe to call from several processes at once: the first builds, the others wait and reuse.
    """
    t0 = time.perf_counter()
    src_fp, handle = source_fingerprint(cfg)
    fp = hashlib.sha256(
        (src_fp + json.dumps(_settings_key(cfg), sort_keys=True)).encode()
    ).hexdigest()
    cache_root = Path(os.path.expanduser(cache_dir(cfg)))
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"data.cache_dir={cfg.cache_dir!r}: cannot create it ({exc.strerror}); choose a writable folder"
        ) from None
    final = cache_root / f"corpus-{fp[:20]}"
    with FileLock(str(final) + ".lock", timeout=3600):
        if not (final / "meta.json").exists():
            _build_cache(cfg, handle, final, fp)
    meta = json.loads((final / "meta.json").read_text())
    prepared = PreparedCorpus(dir=str(final), **meta["corpus"])
    _check_windows(cfg, prepared, seq_len)
    log.info(
        "corpus %s: %s train / %s val tokens, vocab %d (%.1fs)",
        fp[:12],
        f"{prepared.train_tokens:,}",
        f"{prepared.val_tokens:,}",
        prepared.vocab_size,
        time.perf_counter() - t0,
    )
    return prepared


def _describe(cfg: DataConfig) -> str:
    if cfg.source == "stdlib":
        return "data.source=stdlib"
    return f"data.path={cfg.path!r}" if cfg.source == "text" else f"data.name={cfg.name!r}"


def _build_cache(cfg: DataConfig, handle: object, final: Path, fp: str) -> None:
    t0 = time.perf_counter()
    docs = list(iter_documents(cfg, handle))
    train, val, test = split_documents(docs, cfg.val_fraction, cfg.test_fraction)
    if not train:
        raise DataError(
            f"{_describe(cfg)}: the corpus has no non-empty documents ({len(docs)} file(s)/row(s), all empty "
            "or whitespace); point it at text"
        )
    if not val or not test:
        raise DataError(
            f"{_describe(cfg)}: fewer than three non-empty documents, so no validation and test "
            "splits are possible; give at least three documents (files or rows)"
        )
    if cfg.tokenizer.kind == "bpe":
        tok = train_bpe([d.text for d in train], cfg.tokenizer.vocab_size)
    else:
        tok = load_pretrained_tokenizer(str(cfg.tokenizer.name))
    vocab = tok.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    eos = _eos_id(tok)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n_train = _encode_to_file(tok, train, eos, str(tmp / "train.bin"), dtype)
        n_val = _encode_to_file(tok, val, eos, str(tmp / "val.bin"), dtype)
        n_test = _encode_to_file(tok, test, eos, str(tmp / "test.bin"), dtype)
        tok.save(str(tmp / "tokenizer.json"))
        meta = {
            "corpus": {
                "fingerprint": fp,
                "vocab_size": vocab,
                "dtype": dtype.name,
                "eos_id": eos,
                "train_tokens": n_train,
                "val_tokens": n_val,
                "test_tokens": n_test,
                "train_documents": len(train),
                "val_documents": len(val),
                "test_documents": len(test),
            },
            "settings": _settings_key(cfg),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, final)  # publish atomically: meta.json appears with everything else
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared corpus in %.1fs -> %s", time.perf_counter() - t0, final)


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


# ---------------------------------------------------------------- datasets and sampling


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens over a flat token file (a memmap)."""

    def __init__(self, path: str, dtype: str, seq_len: int, max_windows: int | None = None) -> None:
        self.path, self.dtype, self.seq_len = path, np.dtype(dtype), seq_len
        n_tokens = os.path.getsize(path) // self.dtype.itemsize
        self.n = max(0, (n_tokens - 1) // seq_len)
        if max_windows is not None:
            self.n = min(self.n, max_windows)
        self._mm: np.memmap | None = None

    def __len__(self) -> int:
        return self.n

    def _data(self) -> np.memmap:
        # Opened lazily so each DataLoader worker maps the file itself (no pickled memmaps).
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._mm

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return torch.from_numpy(self._data()[start : start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mm"] = None
        return state


class SeededWindowSampler(Sampler[int]):
    """The training order: epoch e is ``randperm(n, seed=(seed, e))``; rank r takes every
    world-th index of that global stream, for exactly ``num_samples`` samples.

    The order is a pure function of (seed, sample index), so a resumed run can start at
    ``start`` without replaying anything, and the effective batch sees the same sequences
    whatever the device count.
    """

    def __init__(
        self, n: int, seed: int, num_samples: int, rank: int = 0, world: int = 1, start: int = 0
    ) -> None:
        if n <= 0:
            raise DataError(
                "the training split gives no windows; use a larger corpus or a smaller model.seq_len"
            )
        self.n, self.seed, self.num_samples = n, seed, num_samples
        self.rank, self.world, self.start = rank, world, start
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    def index(self, k: int) -> int:
        """The window for this rank's k-th sample."""
        j = k * self.world + self.rank
        epoch, pos = divmod(j, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[pos])

    def __iter__(self) -> Iterator[int]:
        for k in range(self.start, self.num_samples):
            yield self.index(k)


class _ResumedSampler(SeededWindowSampler):
    """len() counts the whole run, skipped samples included: Lightning restores its batch counter
    from the checkpoint and neither skips nor replays batches itself, so its counter then lines up
    with the batches still to come (validation and the end fall at the same batches)."""

    def __len__(self) -> int:
        return self.num_samples


class TokenDataModule(pl.LightningDataModule):
    """Windows of the prepared corpus: seeded training order, a fixed validation set."""

    def __init__(
        self,
        cfg: DataConfig,
        corpus: PreparedCorpus,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        samples_per_rank: int,
    ) -> None:
        super().__init__()
        self.cfg, self.corpus, self.seq_len = cfg, corpus, seq_len
        self.micro_batch_size, self.seed, self.samples_per_rank = (
            micro_batch_size,
            seed,
            samples_per_rank,
        )
        self.start_sample = 0  # set by resume: samples this rank already consumed

    def prepare_data(self) -> None:
        # Already prepared by the experiment (it needs the vocabulary to build the model); this
        # re-check is free when cached and keeps the module usable on its own.
        prepare_corpus(self.cfg, self.seq_len)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        ds = TokenWindows(self.corpus.train_path, self.corpus.dtype, self.seq_len)
        rank, world = self._rank_world()
        start = self.start_sample
        if not start and self.trainer is not None and self.trainer.global_step:
            # Resumed (Lightning restores the loops before it asks for the loader): skip what the
            # optimizer steps so far consumed on this rank.
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
            start *= self.micro_batch_size
        sampler = (_ResumedSampler if start else SeededWindowSampler)(
            len(ds), self.seed, self.samples_per_rank, rank, world, start
        )
        return DataLoader(
            ds,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.cfg.num_workers > 0,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        ds = TokenWindows(
            self.corpus.val_path, self.corpus.dtype, self.seq_len, self.cfg.val_max_windows
        )
        rank, world = self._rank_world()
        indices = list(range(rank, len(ds), world))
        return DataLoader(
            torch.utils.data.Subset(ds, indices),
            batch_size=self.micro_batch_size,
            shuffle=False,
            num_workers=0,
        )
