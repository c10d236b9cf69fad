"""Scale table: tokens/s and peak memory against model size and sequence length on this machine.

    python benchmarks/scale.py [--steps 5] [--warmup 2] [overrides ...]

Each cell is a fresh interpreter (peak RSS is a per-process high-water mark) running the bare loop
of benchmarks/_common.py with the default config (batch, precision) and the cell's model width,
depth and sequence length. Memory: on CPU the peak resident set (``resource.getrusage``), also
shown above the interpreter's size before the model was built; on GPU
``torch.cuda.max_memory_allocated``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from _common import bare_train, compose, quiet_environment

# (hidden, layers, heads): about 0.3M, 1M (the default model) and 5M non-embedding parameters.
SIZES = [(64, 2, 2), (128, 4, 4), (256, 6, 4)]
SEQ_LENS = [128, 256]


def rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def one(
    hidden: int, layers: int, heads: int, seq: int, steps: int, warmup: int, extra: list[str]
) -> dict:
    import torch

    from batchsize_study.model import build_model

    quiet_environment()
    c = compose(
        "experiment=superconvergence",
        "lr=0.002",
        f"model.hidden_size={hidden}",
        f"model.num_layers={layers}",
        f"model.num_heads={heads}",
        f"model.seq_len={seq}",
        f"max_steps={warmup + steps}",
        *extra,
    )
    from batchsize_study.data import prepare_corpus

    corpus = prepare_corpus(c.data, seq)
    before = rss_mb()
    n_params = sum(p.numel() for p in build_model(c.model, corpus.vocab_size).parameters())
    t = bare_train(c, warmup)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "hidden": hidden,
        "layers": layers,
        "seq_len": seq,
        "params": n_params,
        "batch": c.batch_size,
        "tokens_per_second": t.tokens_per_second,
        "peak_rss_mb": rss_mb(),
        "rss_before_model_mb": before,
        "gpu_peak_mb": gpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--one", nargs=4, type=int, metavar=("HIDDEN", "LAYERS", "HEADS", "SEQ"))
    ap.add_argument("--sizes", default=None, help="e.g. 64x2x2,128x4x4 (hidden x layers x heads)")
    ap.add_argument("--seq-lens", default=None, help="e.g. 128,256")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (precision=..., ...)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.steps, args.warmup, args.overrides)))
        return
    sizes = (
        [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        if args.sizes
        else SIZES
    )
    seqs = [int(s) for s in args.seq_lens.split(",")] if args.seq_lens else SEQ_LENS
    print(
        "| params | hidden x layers | seq_len | batch | tokens/s | peak RSS MiB (over start) | GPU peak MiB |"
    )
    print("| ---: | :---: | ---: | ---: | ---: | ---: | ---: |")
    for hidden, layers, heads in sizes:
        for seq in seqs:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                str(hidden),
                str(layers),
                str(heads),
                str(seq),
                f"--steps={args.steps}",
                f"--warmup={args.warmup}",
                *args.overrides,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(
                    f"| {hidden}x{layers} seq {seq}: failed: {out.stderr.strip().splitlines()[-1]} |"
                )
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            gpu = f"{r['gpu_peak_mb']:,.0f}" if r["gpu_peak_mb"] is not None else "-"
            print(
                f"| {r['params'] / 1e6:.2f}M | {hidden} x {layers} | {seq} | {r['batch']} | "
                f"{r['tokens_per_second']:,.0f} | {r['peak_rss_mb']:,.0f} "
                f"(+{r['peak_rss_mb'] - r['rss_before_model_mb']:,.0f}) | {gpu} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
