"""Corpus preparation at size: throughput and peak memory, against a nanoGPT-style baseline.

    python benchmarks/data_prep.py [--sizes 0.1,0.3,1] [--single 1] [--files2 0.145]
                                   [--baseline 0.1] [--repeats 3] [--work /tmp/bench-data]

Corpora are built locally from text already on this machine (the standard library's .py files,
site-packages .py/.txt/.md/.rst/.pyi, /usr/share text), repeated under new names until each
size is reached:
- ``many``: the files as they are (tens of kB each), in repetition folders;
- ``single``: one file, the same text concatenated (cut into paragraph blocks by the package);
- ``files2``: two files (the issue's "145 MB in 2 files" row).

Each preparation runs in a fresh child process (``prepare_corpus`` into an empty cache, BPE
trained on the default bounded sample), and reports wall time, MB/s, and peak RSS of the main
process and of the largest encode worker (``resource.getrusage``, ru_maxrss). The baseline, in
its own child: nanoGPT's data/openwebtext/prepare.py with a Hugging Face tokenizer (the one our
run trained) in place of tiktoken: ``load_dataset("text", sample_by="document")``,
``.map(num_proc=N)`` per document, one uint16 memmap. Our side with that same tokenizer
(``data.tokenizer.kind=pretrained``) is timed beside it, so the ratio compares encode + write
alone, in ``--repeats`` pairs whose order alternates; last line ``ratio R`` (baseline time /
ours, > 1: ours is faster: the median pair of each compared rung, the lowest rung).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTS = (".py", ".txt", ".md", ".rst", ".pyi")

OURS = r"""
import json, resource, sys, time, logging
from batchsize_study.config import DataConfig, TokenizerConfig
from batchsize_study.data import prepare_corpus
path, glob, cache, tok = sys.argv[1:5]
tokenizer = TokenizerConfig(kind="pretrained", name=tok) if tok != "-" else TokenizerConfig()
cfg = DataConfig(source="text", path=path, glob=glob, cache_dir=cache, tokenizer=tokenizer)
t0 = time.perf_counter()
c = prepare_corpus(cfg, 128)
wall = time.perf_counter() - t0
meta = json.load(open(c.dir + "/meta.json"))
print(json.dumps({
    "wall": wall, "tokens": c.train_tokens + c.val_tokens + c.test_tokens,
    "docs": [c.train_documents, c.val_documents, c.test_documents],
    "tokenizer_s": meta["seconds"]["tokenizer"], "tokenizer_path": c.tokenizer_path,
    "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""

BASELINE = r"""
import json, os, resource, sys, time
import numpy as np
import datasets
from tokenizers import Tokenizer
datasets.disable_progress_bars()
files, tok_path, out, cache, nproc = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
t0 = time.perf_counter()
tok = Tokenizer.from_file(tok_path)
eos = tok.token_to_id("<|endoftext|>")
def process(example):
    ids = tok.encode(example["text"], add_special_tokens=False).ids
    ids.append(eos)
    return {"ids": ids, "len": len(ids)}
ds = datasets.load_dataset("text", data_files=json.load(open(files)), sample_by="document",
                           split="train", cache_dir=cache)
tokenized = ds.map(process, remove_columns=["text"], num_proc=nproc)
arr_len = int(np.sum(tokenized["len"], dtype=np.uint64))
arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(arr_len,))
idx, total_batches = 0, min(1024, len(tokenized))
for b in range(total_batches):
    batch = tokenized.shard(num_shards=total_batches, index=b, contiguous=True).with_format("numpy")
    arr_batch = np.concatenate(batch["ids"])
    arr[idx : idx + len(arr_batch)] = arr_batch
    idx += len(arr_batch)
arr.flush()
print(json.dumps({
    "wall": time.perf_counter() - t0, "tokens": arr_len,
    "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def source_files() -> list[Path]:
    """Text files on this machine, in a fixed order."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    roots += [Path("/usr/share/doc"), Path("/usr/share/common-licenses")]
    seen: list[Path] = []
    for root in roots:
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.suffix in EXTS and p.is_file() and not p.is_symlink():
                size = p.stat().st_size
                if 200 < size < 2_000_000:
                    seen.append(p)
    return seen


def build(kind: str, size_gb: float, work: Path, files: list[Path]) -> Path:
    """A corpus of about size_gb GB: 'many' files, one 'single' file, or 'files2'."""
    target = int(size_gb * 1e9)
    out = work / f"{kind}-{size_gb:g}GB"
    if (out / ".done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    written, rep = 0, 0
    handles = []
    if kind == "single":
        handles = [open(out / "input.txt", "wb")]  # noqa: SIM115
    elif kind == "files2":
        handles = [open(out / "part1.txt", "wb"), open(out / "part2.txt", "wb")]  # noqa: SIM115
    while written < target:
        for i, f in enumerate(files):
            data = f.read_bytes()
            if kind == "many":
                dest = out / f"rep{rep:03d}" / f"{i:06d}{f.suffix}.txt"
                dest.parent.mkdir(exist_ok=True)
                dest.write_bytes(data)
            else:
                h = handles[0] if kind == "single" or written < target / 2 else handles[1]
                h.write(data + b"\n\n")
            written += len(data)
            if written >= target:
                break
        rep += 1
    for h in handles:
        h.close()
    (out / ".done").write_text(str(written))
    return out


def child(code: str, *args: str) -> dict:
    """Run one measurement in a fresh, niced interpreter; its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "true"}
    res = subprocess.run(
        ["nice", "-n", "5", sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def corpus_mb(path: Path) -> float:
    return int((path / ".done").read_text()) / 1e6


def ours(path: Path, work: Path, tok: str = "-") -> dict:
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    glob = "**/*.txt"
    r = child(OURS, str(path), glob, str(cache), tok)
    r["mb"] = corpus_mb(path)
    return r


def baseline(path: Path, work: Path, tok: str) -> dict:
    cache = work / "hf-cache"
    shutil.rmtree(cache, ignore_errors=True)
    listing = work / "files.json"
    listing.write_text(json.dumps(sorted(str(p) for p in path.rglob("*.txt"))))
    r = child(
        BASELINE, str(listing), tok, str(work / "base.bin"), str(cache), str(os.cpu_count() or 1)
    )
    shutil.rmtree(cache, ignore_errors=True)
    r["mb"] = corpus_mb(path)
    return r


def line(name: str, r: dict) -> str:
    extra = f", BPE {r['tokenizer_s']:.0f}s" if "tokenizer_s" in r else ""
    docs = f", docs train/val/test {r['docs']}" if "docs" in r else ""
    return (
        f"{name:<34} {r['mb']:8.1f} MB  {r['wall']:7.1f} s  {r['mb'] / r['wall']:6.2f} MB/s  "
        f"peak RSS main {r['rss_main_mb']:6.0f} MB, largest worker {r['rss_worker_mb']:5.0f} MB"
        f"{extra}{docs}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1,0.3,1", help="GB, many-files ladder")
    ap.add_argument("--single", default="1", help="GB, single-file rungs")
    ap.add_argument("--files2", default="", help="GB, two-file rungs")
    ap.add_argument("--baseline", default="0.1", help="GB of the many-files rungs to compare")
    ap.add_argument("--work", default="/tmp/bench-data")
    ap.add_argument("--repeats", type=int, default=3, help="baseline/ours pairs per compared rung")
    args = ap.parse_args()
    gb = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = source_files()
    print(
        f"# {len(files)} source files; {os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.1f} at start (measurements under that load)",
        flush=True,
    )
    plan = [("many", s) for s in gb(args.sizes)] + [("single", s) for s in gb(args.single)]
    plan += [("files2", s) for s in gb(args.files2)]
    plan.sort(key=lambda p: p[1])  # small rungs first: they finish even if time runs out
    ratios = []
    for kind, size in plan:
        t0 = time.perf_counter()
        path = build(kind, size, work, files)
        print(f"# built {path} in {time.perf_counter() - t0:.0f}s", flush=True)
        r = ours(path, work)
        print(line(f"ours {kind} {size:g} GB", r), flush=True)
        if size in gb(args.baseline):
            tok = str(work / "tokenizer.json")
            shutil.copy(r["tokenizer_path"], tok)
            # Interleaved pairs, the order alternating (B O, O B, ...), so a drift in the
            # machine's load hits both sides alike; the rung's ratio is the median pair's.
            pair_ratios = []
            for i in range(args.repeats):
                order = ("baseline", "ours") if i % 2 == 0 else ("ours", "baseline")
                got = {
                    side: baseline(path, work, tok) if side == "baseline" else ours(path, work, tok)
                    for side in order
                }
                b, o = got["baseline"], got["ours"]
                print(line(f"baseline datasets.map {kind} {size:g} GB", b), flush=True)
                print(line(f"ours, same tokenizer {kind} {size:g} GB", o), flush=True)
                pair_ratios.append(b["wall"] / o["wall"])
                print(f"  pair {i + 1} ({' then '.join(order)}): ratio {pair_ratios[-1]:.2f}; "
                      f"same token count: {o['tokens'] == b['tokens']} "
                      f"({o['tokens']:,} vs {b['tokens']:,})", flush=True)  # fmt: skip
            ratios.append(statistics.median(pair_ratios))
            print(f"  {kind} {size:g} GB: median ratio {ratios[-1]:.2f} over "
                  f"{len(pair_ratios)} pairs ({min(pair_ratios):.2f}..{max(pair_ratios):.2f})")  # fmt: skip
        shutil.rmtree(work / "cache", ignore_errors=True)
    if ratios:
        print(f"ratio {min(ratios):.2f}  (baseline wall / ours; lowest over {len(ratios)} rungs)")


if __name__ == "__main__":
    main()
