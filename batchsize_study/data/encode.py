"""The tokenizer side: BPE training on a stream, and the encode worker.

This module imports only ``tokenizers`` and ``numpy``: the encode pool's workers import it, and
each worker's start-up time and memory are paid once per core.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import numpy as np

MAX_RUN = 512
_LONG_RUN = re.compile(rf"\S{{{MAX_RUN + 1},}}")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class TokenizerLoadError(Exception):
    """A pretrained tokenizer could not be loaded (turned into a DataError by the caller)."""


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


def train_bpe(texts: Iterable[str], vocab_size: int):  # noqa: ANN201 - tokenizers.Tokenizer
    """Byte-level BPE (GPT-2 style): no unknown tokens.

    ``texts`` is consumed as a stream: the trainer keeps word counts, not the text, so its memory
    follows the number of distinct words in the sample, not the sample's size.
    """
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
    pieces = (p for t in texts for p in split_long_runs(t))
    tok.train_from_iterator(pieces, trainer=trainer)
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
        raise TokenizerLoadError(type(exc).__name__) from None


def eos_id(tok) -> int | None:  # noqa: ANN001
    for cand in EOS_CANDIDATES:
        tid = tok.token_to_id(cand)
        if tid is not None:
            return tid
    return None


def encode_texts(
    tok, texts: list[str], eos: int | None, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(tokens of all texts, each followed by eos, concatenated; tokens per text).

    One ``encode_batch_fast`` call per chunk: the call's fixed cost is paid once for many
    documents, and the offsets it would compute are never used.
    """
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    pieces = [split_long_runs(t) for t in texts]
    encs = iter(encode([p for ps in pieces for p in ps], add_special_tokens=False))
    parts: list[np.ndarray] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    tail = np.asarray([eos], dtype=dtype) if eos is not None else None
    for i, ps in enumerate(pieces):
        for _ in ps:
            ids = np.asarray(next(encs).ids, dtype=dtype)
            parts.append(ids)
            lengths[i] += ids.size
        if tail is not None:
            parts.append(tail)
            lengths[i] += 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return tokens, lengths


# ---------------------------------------------------------------- pool worker

_WORKER: dict = {}


def init_worker(tokenizer_json: str, eos: int | None, dtype: str) -> None:
    """Pool initializer: one tokenizer per process, encoding on one thread (the pool is the
    parallelism; Rust threads inside each of N processes would oversubscribe the cores)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tokenizer_json), eos=eos, dtype=np.dtype(dtype))


def encode_in_worker(texts: list[str]) -> tuple[bytes, np.ndarray]:
    tokens, lengths = encode_texts(_WORKER["tok"], texts, _WORKER["eos"], _WORKER["dtype"])
    return tokens.tobytes(), lengths
