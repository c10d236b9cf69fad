"""Data path: first preparation of the default corpus, the cached start, and a nanoGPT-style
baseline with the same tokenizer.

    python benchmarks/data_prep.py [--repeats 3] [overrides ...]

1. first preparation: ``data.prepare_corpus`` into an empty cache (read the stdlib, split by
   document, train the BPE, encode, write uint16 files), timed by stage;
2. cached start: ``prepare_corpus`` again (in this process, and in a fresh interpreter including
   its imports), which only stats the files and reads meta.json;
3. baseline (nanoGPT's data/openwebtext/prepare.py): ``datasets.Dataset.from_dict`` of the same
   training documents, ``.map`` with the same trained tokenizer (per example, one process per
   core), concatenate into a uint16 memmap in shards, write.

The encode-and-write stage is what the baseline replaces, so its ratio is the fair one; the whole
first preparation is printed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from _common import REPO, compose


def baseline_nanogpt(texts: list[str], tokenizer_path: str, out: str, eos: int) -> int:
    """nanoGPT's prepare.py with a Hugging Face tokenizer in place of tiktoken."""
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    tok = Tokenizer.from_file(tokenizer_path)

    def process(example: dict) -> dict:
        ids = tok.encode(example["text"], add_special_tokens=False).ids
        ids.append(eos)
        return {"ids": ids, "len": len(ids)}

    ds = datasets.Dataset.from_dict({"text": texts})
    tokenized = ds.map(process, remove_columns=["text"], num_proc=os.cpu_count() or 1)
    arr_len = int(np.sum(tokenized["len"], dtype=np.uint64))
    arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(arr_len,))
    idx, total_batches = 0, min(64, len(tokenized))
    for b in range(total_batches):
        batch = tokenized.shard(num_shards=total_batches, index=b, contiguous=True).with_format(
            "numpy"
        )
        arr_batch = np.concatenate(batch["ids"])
        arr[idx : idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    return arr_len


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="cached starts and encode repeats")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (data=..., data.*)")
    args = ap.parse_args()
    from batchsize_study import data as D

    cache = tempfile.mkdtemp(prefix="bench-data-")
    try:
        c = compose(f"data.cache_dir={cache}", *args.overrides)
        # 1. first preparation, whole and by stage
        t0 = time.perf_counter()
        corpus = D.prepare_corpus(c.data, c.model.seq_len)
        first = time.perf_counter() - t0
        print(
            f"first preparation: {first:.1f}s for {corpus.train_tokens + corpus.val_tokens:,} "
            f"tokens ({corpus.train_documents + corpus.val_documents} documents, vocab "
            f"{corpus.vocab_size})",
            flush=True,
        )
        t0 = time.perf_counter()
        _, handle = D.source_fingerprint(c.data)
        docs = list(D.iter_documents(c.data, handle))
        train, _, _ = D.split_documents(docs, c.data.val_fraction, c.data.test_fraction)
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        D.train_bpe([d.text for d in train], c.data.tokenizer.vocab_size)
        t_bpe = time.perf_counter() - t0
        print(f"  stages: read+split {t_read:.1f}s, train BPE {t_bpe:.1f}s", flush=True)

        # 2. cached start
        cached = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            D.prepare_corpus(c.data, c.model.seq_len)
            cached.append(time.perf_counter() - t0)
        # A fresh interpreter: imports, the config, and the cache check, as a new run pays them.
        code = (
            "import sys, time; t0 = time.perf_counter(); sys.path.insert(0, sys.argv[1]); "
            "from _common import compose; from batchsize_study.data import prepare_corpus; "
            "c = compose(*sys.argv[2:]); prepare_corpus(c.data, c.model.seq_len); "
            "print(time.perf_counter() - t0)"
        )
        argv = [str(REPO / "benchmarks"), f"data.cache_dir={cache}", *args.overrides]
        fresh = [
            float(
                subprocess.run(
                    [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
                ).stdout.split()[-1]
            )
            for _ in range(args.repeats)
        ]
        print(
            f"cached start: prepare_corpus {statistics.median(cached):.2f}s "
            f"(min {min(cached):.2f}, max {max(cached):.2f}); fresh interpreter incl. imports "
            f"{statistics.median(fresh):.2f}s (min {min(fresh):.2f}, max {max(fresh):.2f})",
            flush=True,
        )

        # 3. encode + write: ours vs the nanoGPT-style baseline, same tokenizer, same documents
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(corpus.tokenizer_path)
        eos = corpus.eos_id if corpus.eos_id is not None else 0
        ours, base = [], []
        for r in range(args.repeats):
            for which in ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours"):
                out = os.path.join(cache, f"{which}.bin")
                t0 = time.perf_counter()
                if which == "ours":
                    n_ours = D._encode_to_file(tok, train, eos, out, np.dtype(np.uint16))
                    ours.append(time.perf_counter() - t0)
                else:
                    n_base = baseline_nanogpt(
                        [d.text for d in train], corpus.tokenizer_path, out, eos
                    )
                    base.append(time.perf_counter() - t0)
        same = np.array_equal(
            np.fromfile(os.path.join(cache, "ours.bin"), dtype=np.uint16),
            np.fromfile(os.path.join(cache, "baseline.bin"), dtype=np.uint16),
        )
        print(
            f"encode+write {n_ours:,} train tokens: ours {statistics.median(ours):.1f}s "
            f"(min {min(ours):.1f}, max {max(ours):.1f}), nanoGPT-style datasets.map "
            f"{statistics.median(base):.1f}s (min {min(base):.1f}, max {max(base):.1f}); "
            f"identical tokens: {same and n_ours == n_base}"
        )
        whole_base = t_read + t_bpe + statistics.median(base)
        print(
            f"whole first preparation vs read + BPE + baseline encode: {first:.1f}s vs "
            f"{whole_base:.1f}s (ratio {whole_base / first:.2f})"
        )
        print(
            f"speedup of encode+write over the baseline: {statistics.median(base) / statistics.median(ours):.2f}x"
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
