"""Where documents come from, one at a time: nothing here holds a corpus in memory.

Sources: the Python standard library's own source (the default: every Python machine has it),
local text (a file, a folder, a glob), and Hugging Face datasets (memory-mapped, or streamed
with ``data.streaming=true``).

A document is a file, a dataset row, or a block of one. **The cutting rule** (deterministic, so
the same text always gives the same documents and the same split): a file that is the only
file of its corpus, or that is larger than ``data.long_document_chars`` (bytes on disk), and a
row longer than that many characters, is cut into blocks of whole paragraphs of at most
``data.block_chars`` characters. Each block ends after the last blank line in its second half,
else after the last line break there, else at exactly ``block_chars``; blocks are named
``<name>#<k>``. This is how one ``input.txt`` gets validation and test splits (nanoGPT's
single-file datasets cut by position instead).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from batchsize_study.config import DataConfig
from batchsize_study.errors import DataError

READ_CHARS = 1 << 20  # a big file is read in 1M-character pieces


@dataclass
class Document:
    name: str
    text: str


@dataclass
class Source:
    """What :func:`source_fingerprint` found: enough to read the corpus later, and its size."""

    kind: str
    root: str = ""
    files: list[str] | None = None
    dataset: Any = None
    total_bytes: int | None = None
    """Size on disk (files) or as the dataset reports it; None when unknown (streams)."""

    # Kept iterable as (root, files) for callers of the one-release-old tuple handle.
    def __iter__(self) -> Iterator[Any]:
        return iter((self.root, self.files))


def stdlib_root() -> str:
    """The Python standard library's source folder: the corpus every Python machine has."""
    return sysconfig.get_paths()["stdlib"]


def python_version() -> str:
    """The stdlib corpus differs between Python versions: records carry the one it came from."""
    return ".".join(map(str, sys.version_info[:3]))


# ---------------------------------------------------------------- files


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


def _open_text(path: str):  # noqa: ANN202 - a text file object
    # Some stdlib files are deliberately not UTF-8 (test fixtures): decode with replacement.
    # newline="" keeps the bytes' line endings: the text is what is on disk.
    return open(path, encoding="utf-8", errors="replace", newline="")


def _read_pieces(path: str) -> Iterator[str]:
    with _open_text(path) as fh:
        while piece := fh.read(READ_CHARS):
            yield piece


# ---------------------------------------------------------------- hub datasets


def _load_hub(cfg: DataConfig) -> tuple[Any, str]:
    """(dataset, fingerprint text) of a hub source; a datasets.IterableDataset when streaming.

    Nothing here reads the rows: a streamed dataset is read as it is iterated, a memory-mapped
    one is iterated in batches of one column.
    """
    import datasets

    name = os.path.expanduser(str(cfg.name))
    try:
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "state.json")):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(
                        f"data.split={cfg.split!r}: not in the dataset; choose one of {list(ds)}"
                    )
                ds = ds[cfg.split]
            ident = f"disk|{ds._fingerprint}|{len(ds)}"
            if cfg.streaming:
                ds = ds.to_iterable_dataset()
        elif cfg.streaming:
            builder = datasets.load_dataset_builder(name, **dict(cfg.options))
            # The builder's hash covers its resolved data files (a hub revision, local mtimes).
            ident = f"stream|{builder.config_id}|{builder.hash}"
            ds = builder.as_streaming_dataset(split=cfg.split)
        else:
            ds = datasets.load_dataset(name, split=cfg.split, **dict(cfg.options))
            ident = f"map|{ds._fingerprint}|{len(ds)}"
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (offline, missing, bad format)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"data.name={cfg.name!r}: could not load the dataset ({type(exc).__name__}: {first[:200]}); "
            "check the name, data.split and data.options, or download it first while online "
            "(HF_DATASETS_OFFLINE=1 uses the local cache), or use data=text with local files"
        ) from None
    columns = ds.column_names
    if columns is not None and cfg.text_field not in columns:
        raise DataError(
            f"data.text_field={cfg.text_field!r}: not a column of {cfg.name!r}; columns are {columns}"
        )
    return ds, ident


def _iter_rows(cfg: DataConfig, ds: Any) -> Iterator[str]:
    """The text column, a batch at a time: never a whole column in memory."""
    if ds.column_names is not None:
        ds = ds.select_columns([cfg.text_field])
    for batch in ds.iter(batch_size=256):
        if cfg.text_field not in batch:
            raise DataError(
                f"data.text_field={cfg.text_field!r}: not a column of {cfg.name!r}; columns are "
                f"{sorted(batch)}"
            )
        for text in batch[cfg.text_field]:
            yield text or ""


# ---------------------------------------------------------------- the corpus as a stream


def source_fingerprint(cfg: DataConfig) -> tuple[str, Source]:
    """A hash of the corpus as it is now, and a handle to read it later.

    Files are hashed by (relative path, size, mtime) so a cached start does not read the corpus;
    hub datasets by their own content fingerprint (memory-mapped) or their builder's hash of the
    resolved data files (streamed).
    """
    h = hashlib.sha256()
    if cfg.source == "hub":
        ds, ident = _load_hub(cfg)
        h.update(f"hub|{cfg.name}|{cfg.split}|{cfg.text_field}|{ident}".encode())
        size = getattr(ds, "dataset_size", None) if not cfg.streaming else None
        return h.hexdigest(), Source("hub", dataset=ds, total_bytes=size or None)
    root, files = _list_files(cfg)
    total = 0
    for i, f in enumerate(files):
        st = os.stat(f)
        if cfg.max_documents is None or i < cfg.max_documents:
            total += st.st_size  # an upper bound when a cut file's blocks fill max_documents
        h.update(f"{os.path.relpath(f, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest(), Source(cfg.source, root=root, files=files, total_bytes=total)


def cut_blocks(pieces: Iterable[str], block_chars: int) -> Iterator[str]:
    """Blocks of whole paragraphs of at most ``block_chars`` characters (the rule in the module
    docstring), from a text given as consecutive pieces; ``"".join`` of the blocks is the text."""
    buf, pos = "", 0
    half = block_chars // 2
    for piece in pieces:
        buf = buf[pos:] + piece
        pos = 0
        while len(buf) - pos > block_chars:
            end = pos + block_chars
            cut = buf.rfind("\n\n", pos + half, end)
            if cut >= 0:
                cut += 2
            else:
                cut = buf.rfind("\n", pos + half, end)
                cut = cut + 1 if cut >= 0 else end
            yield buf[pos:cut]
            pos = cut
    if len(buf) > pos:
        yield buf[pos:]


def _blocks(name: str, pieces: Iterable[str], block_chars: int) -> Iterator[Document]:
    for k, block in enumerate(cut_blocks(pieces, block_chars)):
        yield Document(f"{name}#{k:06d}", block)


def iter_documents(
    cfg: DataConfig, source: Source, skip: Callable[[str], bool] | None = None
) -> Iterator[Document]:
    """The corpus's documents in a fixed order, cut by the module's rule.

    ``skip(name)``: a whole file that it accepts is not read (its Document has empty text).
    Lets a sampling pass over a folder read only the files it samples.
    """
    docs = _iter_all(cfg, source, skip)
    return islice(docs, cfg.max_documents) if cfg.max_documents is not None else docs


def _iter_all(
    cfg: DataConfig, source: Source, skip: Callable[[str], bool] | None
) -> Iterator[Document]:
    if source.kind == "hub":
        for i, text in enumerate(_iter_rows(cfg, source.dataset)):
            name = f"{i:09d}"
            if len(text) > cfg.long_document_chars:
                yield from _blocks(name, [text], cfg.block_chars)
            else:
                yield Document(name, text)
        return
    files = source.files or []
    for f in files:
        name = os.path.relpath(f, source.root)
        if len(files) == 1 or os.path.getsize(f) > cfg.long_document_chars:
            yield from _blocks(name, _read_pieces(f), cfg.block_chars)
        elif skip is not None and skip(name):
            yield Document(name, "")
        else:
            with _open_text(f) as fh:
                yield Document(name, fh.read())
