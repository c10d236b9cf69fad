"""Overhead of the gradient-noise-scale measurement (batchsize_study.noise), on the real model.

1. hooks: forward+backward with and without the per-parameter gradient hooks;
2. split: one micro-batch of 16 against two of 8 (noise.split=2 when accumulation is 1; the study
   splits only every noise.split_every-th step, inside the training step).
Interleaved A/B, median of many repetitions, one CPU thread: on a shared, loaded CPU every extra
small op otherwise pays OpenMP barrier waits and the end-to-end tokens/s swings several-fold.

    python benchmarks/noise_overhead.py [threads]

3. ``--onepass``: the alternative the split was measured against. The micro batch stays whole (one
   forward, one backward) and each half's gradient is taken inside the backward: every Linear's
   weight gradient is computed as two half-batch matmuls (the same FLOPs as one), the embedding's
   as two index-adds, the RMSNorm weights' from a per-row view. It checks (fp32) that the halves'
   squared norms equal the split's, then times, interleaved, in bf16 autocast on all threads as
   the runs train: 16 x 1 (an unmeasured step), 2 x 8 (the split), 16 one-pass. Llama only.

    python benchmarks/noise_overhead.py --onepass      # results/noise_onepass.txt
4. ``--metrics <run>/metrics.csv``: the real path's own per-step cost of the split, from a
   small_batch run's tokens/s: measured steps (every noise.split_every-th) against the others
   of the same run (no second run, so no drift between them).

    python -m batchsize_study experiment=small_batch lr=0.003 max_steps=240 logger=csv \
        trainer.enable_progress_bar=false study.dir=/tmp/split_cost
    python benchmarks/noise_overhead.py --metrics /tmp/split_cost/runs/*/metrics.csv
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import nullcontext

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


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy on fp32 logits, as the module's loss."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
    )


def fwd_bwd(
    model: torch.nn.Module,
    x: torch.Tensor,
    chunks: int = 1,
    ctx=nullcontext,  # noqa: ANN001
) -> None:
    """Forward+backward of ``x`` in ``chunks`` pieces (each loss / chunks), under ``ctx()``."""
    for c in x.chunk(chunks):
        with ctx():
            loss = next_token_loss(model, c) / chunks
        loss.backward()
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


class _Halves:
    """Per-half gradients of each parameter, summed over the parameter's uses (tied weights)."""

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces
        self.grads: dict[int, list[torch.Tensor | None]] = {}

    def add(self, key: int, i: int, g: torch.Tensor) -> None:
        slot = self.grads.setdefault(key, [None] * self.pieces)
        slot[i] = g.float() if slot[i] is None else slot[i] + g

    def sum_sq(self) -> torch.Tensor:
        """sum over halves and parameters of |g_half|^2 (what the split's hooks add up)."""
        return sum(
            torch.linalg.vector_norm(g, dtype=torch.float32).square()
            for slot in self.grads.values()
            for g in slot
            if g is not None
        )


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class _HalvesLinear(torch.autograd.Function):
    """y = x W^T (autocast's dtype); backward: dX whole, dW as one matmul per half."""

    @staticmethod
    def forward(ctx, x, w, rec, key):  # noqa: ANN001, ANN205
        cd = _compute_dtype(x)
        xc, wc = x.to(cd), w.to(cd)
        ctx.save_for_backward(xc, wc)
        ctx.rec, ctx.key, ctx.dtypes = rec, key, (x.dtype, w.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(xc, wc)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        xc, wc = ctx.saved_tensors
        dy = dy.to(wc.dtype)
        dw = None
        for i, (d, x) in enumerate(zip(dy.chunk(ctx.rec.pieces), xc.chunk(ctx.rec.pieces))):
            g = d.reshape(-1, d.size(-1)).t() @ x.reshape(-1, x.size(-1))
            ctx.rec.add(ctx.key, i, g)
            dw = g.float() if dw is None else dw + g
        return (dy @ wc).to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), None, None


class _HalvesEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, w, rec, key):  # noqa: ANN001, ANN205
        ctx.save_for_backward(ids)
        ctx.rec, ctx.key, ctx.shape = rec, key, w.shape
        return torch.nn.functional.embedding(ids, w)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        (ids,) = ctx.saved_tensors
        dw = torch.zeros(ctx.shape, device=dy.device)
        for i, (d, ix) in enumerate(zip(dy.chunk(ctx.rec.pieces), ids.chunk(ctx.rec.pieces))):
            g = torch.zeros_like(dw).index_add_(0, ix.flatten(), d.reshape(-1, d.size(-1)).float())
            ctx.rec.add(ctx.key, i, g)
            dw += g
        return None, dw, None, None


def _onepass_forwards(model: torch.nn.Module, rec: _Halves) -> dict[torch.nn.Module, object]:
    """Forward replacements of every parameterised module of a Llama model; refuses others."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def linear(mod):  # noqa: ANN001, ANN202
        return lambda x: _HalvesLinear.apply(x, mod.weight, rec, id(mod.weight))

    def embedding(mod):  # noqa: ANN001, ANN202
        return lambda ids: _HalvesEmbedding.apply(ids, mod.weight, rec, id(mod.weight))

    def rmsnorm(mod):  # noqa: ANN001, ANN202
        def fwd(h: torch.Tensor) -> torch.Tensor:  # LlamaRMSNorm.forward, weight seen per row
            z = h.float()
            z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
            w = mod.weight.view(1, 1, -1).expand(h.size(0), 1, -1)
            key = id(mod.weight)

            def per_half(g: torch.Tensor) -> None:
                for i, gi in enumerate(g.chunk(rec.pieces)):
                    rec.add(key, i, gi.sum((0, 1)))

            w.register_hook(per_half)
            return w * z.to(h.dtype)

        return fwd

    out: dict[torch.nn.Module, object] = {}
    for mod in model.modules():
        if not list(mod.parameters(recurse=False)):
            continue
        if isinstance(mod, torch.nn.Linear) and mod.bias is None:
            out[mod] = linear(mod)
        elif isinstance(mod, torch.nn.Embedding):
            out[mod] = embedding(mod)
        elif isinstance(mod, LlamaRMSNorm):
            out[mod] = rmsnorm(mod)
        else:
            raise SystemExit(f"--onepass: no per-half backward for {type(mod).__name__}")
    return out


def onepass() -> None:
    """Section 3 of the module docstring."""
    from _common import autocast_for

    from batchsize_study.runtime import tune_host_allocator

    print(f"host allocator (as the runs): {tune_host_allocator('auto', 'cpu')}")
    cfg, vocab = MODELS["default tiny (h128 L4 seq128 V4096)"]
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    x = torch.randint(0, vocab, (16, cfg.seq_len + 1))
    rec = _Halves(2)
    forwards = _onepass_forwards(model, rec)

    def halves_in_one_pass(ctx) -> torch.Tensor:  # noqa: ANN001
        rec.grads.clear()
        for mod, fwd in forwards.items():
            mod.forward = fwd
        try:
            with ctx:
                loss = next_token_loss(model, x)
            loss.backward()
        finally:
            for mod in forwards:
                del mod.forward  # back to the class's forward
        model.zero_grad(set_to_none=True)
        return rec.sum_sq()

    split_sq = 0.0
    for half in x.chunk(2):  # the split, fp32: each half's loss / 2, as backward_in_pieces
        (next_token_loss(model, half) / 2).backward()
        split_sq += float(sum(p.grad.square().sum() for p in model.parameters()))
        model.zero_grad(set_to_none=True)
    one_sq = float(halves_in_one_pass(nullcontext()))
    print(
        f"check (fp32): sum of the halves' |g|^2 split {split_sq:.6g}, one pass {one_sq:.6g} "
        f"(rel. diff {abs(one_sq / split_sq - 1):.1e})"
    )

    def bf16() -> object:
        return autocast_for("bf16-mixed", torch.device("cpu"))

    runs = {
        "16 x 1": lambda: fwd_bwd(model, x, 1, bf16),
        "2 x 8 (split)": lambda: fwd_bwd(model, x, 2, bf16),
        "16 one-pass": lambda: halves_in_one_pass(bf16()),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        f()
    for _ in range(15):
        for name, f in runs.items():
            t = time.perf_counter()
            for _ in range(4):
                f()
            times[name].append((time.perf_counter() - t) / 4)
    base = statistics.median(times["16 x 1"])
    print(f"{torch.get_num_threads()} threads, bf16 autocast, 15 interleaved rounds of 4 steps:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:14s} {med * 1e3:7.1f} ms per fwd+bwd  ({med / base:.3f} x 16 x 1)")


def from_metrics(path: str, every: int = 4, skip: int = 20) -> None:
    """Section 4: measured (split) steps against the others of the same small_batch run."""
    import csv

    split, plain = [], []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["train_loss"] and row["tokens_per_second"] and int(row["step"]) > skip:
                # metrics.csv's step s is the update of global_step s - 1 (noise.splits_step).
                (split if (int(row["step"]) - 1) % every == 0 else plain).append(
                    float(row["tokens_per_second"])
                )
    a, b = statistics.median(split), statistics.median(plain)
    print(
        f"{path}: measured steps {a:,.0f} tokens/s (n={len(split)}), others {b:,.0f} (n={len(plain)}): "
        f"a measured step takes {b / a - 1:+.1%} longer; over the run {(b / a - 1) / every:+.1%} time"
    )


def main() -> None:
    if "--onepass" in sys.argv:
        onepass()
        return
    if "--metrics" in sys.argv:
        from_metrics(sys.argv[sys.argv.index("--metrics") + 1])
        return
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    for name, (cfg, vocab) in MODELS.items():
        bench(name, cfg, vocab)


if __name__ == "__main__":
    main()
