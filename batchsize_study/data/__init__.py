"""Text in, packed token windows out.

corpus (stdlib | text files | one big file cut into documents | hub dataset, streamed or not)
-> documents -> deterministic train/val/test split by document name -> tokenizer (byte-level BPE
trained on a bounded sample of the training split, or a pretrained one) -> token files written
as they are made, encoded in parallel (uint16 where the vocabulary fits, as nanoGPT's
prepare.py) -> windows of ``seq_len + 1`` tokens.

- :mod:`.sources`: where documents come from, streamed one at a time;
- :mod:`.encode`: the tokenizer side (BPE training, the encode worker), importing only
  ``tokenizers`` and ``numpy`` so pool workers start light;
- :mod:`.prepare`: the split, the token cache (one build per fingerprint, under a lock,
  published with one atomic rename), its content hash;
- :mod:`.windows`: windows, the seeded order and the Lightning data module.

The light submodules are imported here (a spawned encode worker, which imports this package,
pays about 0.2 s for them: the config schema and the file lock); only :mod:`.windows` (torch and
Lightning, seconds) is resolved on first use (PEP 562), so those workers never load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batchsize_study.data.encode import (
    MAX_RUN,
    load_pretrained_tokenizer,
    split_long_runs,
    train_bpe,
)
from batchsize_study.data.prepare import (
    PreparedCorpus,
    cache_dir,
    prepare_corpus,
    split_documents,
    split_of,
)
from batchsize_study.data.sources import (
    Document,
    cut_blocks,
    iter_documents,
    source_fingerprint,
    stdlib_root,
)

if TYPE_CHECKING:
    from batchsize_study.data.windows import SeededWindowSampler, TokenDataModule, TokenWindows

# Lazy, deliberately: windows imports torch and Lightning, which the encode workers never need.
_LAZY = ("SeededWindowSampler", "TokenDataModule", "TokenWindows")

__all__ = [
    "Document",
    "MAX_RUN",
    "PreparedCorpus",
    "SeededWindowSampler",
    "TokenDataModule",
    "TokenWindows",
    "cache_dir",
    "cut_blocks",
    "iter_documents",
    "load_pretrained_tokenizer",
    "prepare_corpus",
    "source_fingerprint",
    "split_documents",
    "split_long_runs",
    "split_of",
    "stdlib_root",
    "train_bpe",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.windows"), name)
