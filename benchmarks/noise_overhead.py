"""Overhead of the gradient-noise-scale measurement (batchsize_study.noise), on the real model.

1. hooks: forward+backward with and without the per-parameter gradient hooks;
2. split: one micro-batch of 16 against two of 8 (noise.split=2 when accumulation is 1; the study
   splits only every noise.split_every-th step, inside the training step).
Interleaved A/B, median of many repetitions, one CPU thread: on a shared, loaded CPU every extra
small op otherwise pays OpenMP barrier waits and the end-to-end tokens/s swings several-fold.

    python benchmarks/noise_overhead.py [threads]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from batchsize_study.config import ModelConfig
from batchsize_study.model import build_model
from batchsize_study.noise import NoiseScaleCallback

MODELS = {
    "smoke (h32 L2 seq32 V512)": (
        ModelConfig(hidden_size=32, num_layers=2, num_heads=2, seq_len=32),
        512,
    ),
    "default tiny (h128 L4 seq128 V4096)": (ModelConfig(), 4096),
}


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor, chunks: int = 1) -> None:
    for c in x.chunk(chunks):
        logits = model(input_ids=c[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), c[:, 1:].reshape(-1)
        )
        (loss / chunks).backward()
    model.zero_grad(set_to_none=True)


def interleaved(a, b, reps: int) -> tuple[float, float]:  # noqa: ANN001
    ta, tb = [], []
    for i in range(reps):
        for f, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def bench(name: str, cfg: ModelConfig, vocab: int) -> None:
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    reps = 40 if "smoke" in name else 10
    x8 = torch.randint(0, vocab, (8, cfg.seq_len + 1))
    cb = NoiseScaleCallback(4, 8)
    cb._micro_sq = torch.zeros(())

    def hooked() -> None:
        hs = [p.register_hook(cb._on_grad) for p in model.parameters()]
        try:
            fwd_bwd(model, x8)
        finally:
            for h in hs:
                h.remove()

    fwd_bwd(model, x8)
    off, on = interleaved(lambda: fwd_bwd(model, x8), hooked, reps)
    print(
        f"{name} hooks: micro 8 fwd+bwd {off * 1e3:.1f} ms -> {on * 1e3:.1f} ms ({100 * (on / off - 1):+.1f} %)"
    )
    x16 = torch.randint(0, vocab, (16, cfg.seq_len + 1))
    one, two = interleaved(
        lambda: fwd_bwd(model, x16, 1), lambda: fwd_bwd(model, x16, 2), reps // 2
    )
    print(
        f"{name} split: batch 16 as 1x16 {one * 1e3:.1f} ms, as 2x8 {two * 1e3:.1f} ms ({100 * (two / one - 1):+.1f} %)"
    )


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    for name, (cfg, vocab) in MODELS.items():
        bench(name, cfg, vocab)


if __name__ == "__main__":
    main()
