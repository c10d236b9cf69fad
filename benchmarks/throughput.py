"""Training throughput: the package against a bare PyTorch loop, side by side.

    python benchmarks/throughput.py [--rounds 3] [--steps 30] [--warmup 5] [overrides ...]

(a) the package: ``experiments.run`` with the default experiment, i.e. the Lightning Trainer, the
    LightningModule, the data module, the recorder, the detector, the progress bar and the
    default loggers (wandb offline) all on; (b) a bare loop (benchmarks/_common.py: same model
    class, AdamW groups, schedule, clipping, autocast and sampler order over the same token
    file). They run in lockstep in one process: after each package step one bare step runs, and
    each side is charged only its own stretch of wall time (after ``--warmup`` steps), so a
    machine shared with other work slows both alike; rounds give the spread. Prints tokens/s of each (median, min..max) and, as the last line,
    ``ratio <median over rounds of package/bare>``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics

from _common import (
    compose,
    fresh_study_dir,
    lockstep_train,
    median_spread,
    quiet_environment,
    rel_spread,
)

# The default experiment, kept stable (a low LR target, so the detector never stops a round) and
# validated only after the last step (validation is not training throughput).
BASE = (
    "experiment=superconvergence",
    "lr=0.002",
    "force=true",
    "data.val_max_windows=4",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="measured optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps per run")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads for both (0: torch's default, what a user gets)",
    )
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (model=..., precision=...)")
    args = ap.parse_args()
    quiet_environment()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    overrides = [*BASE, f"max_steps={total}", f"val_every_steps={total}", *args.overrides]
    probe = compose(*overrides, "study.dir=/tmp/unused")
    print(
        f"model {probe.model.arch} h{probe.model.hidden_size} L{probe.model.num_layers} "
        f"seq {probe.model.seq_len}, batch {probe.batch_size} (micro {probe.micro_batch_size}), "
        f"precision {probe.precision}, compile {probe.compile}, attn {probe.model.attn_implementation}; "
        f"{args.rounds} rounds of {args.warmup}+{args.steps} steps, {threads()} threads",
        flush=True,
    )
    bare, pkg, ratios, cpu_ratios = [], [], [], []
    record: dict = {}
    for r in range(args.rounds):
        sdir = fresh_study_dir("throughput")
        c = compose(*overrides, f"study.dir={sdir}")
        p, b = lockstep_train(c, args.warmup)
        record = (p.extra or {}).get("record", {})
        shutil.rmtree(sdir, ignore_errors=True)
        bare.append(b.tokens_per_second)
        pkg.append(p.tokens_per_second)
        ratios.append(p.tokens_per_second / b.tokens_per_second)
        cpu_ratios.append(p.cpu_tokens_per_second / b.cpu_tokens_per_second)
        print(
            f"round {r + 1}: bare {b.tokens_per_second:,.0f} tok/s, package "
            f"{p.tokens_per_second:,.0f} tok/s, ratio {ratios[-1]:.3f} "
            f"(per CPU-second: {cpu_ratios[-1]:.3f})",
            flush=True,
        )
    print(f"bare    tokens/s: {median_spread(bare)}  spread {rel_spread(bare):.1%}")
    print(f"package tokens/s: {median_spread(pkg)}  spread {rel_spread(pkg):.1%}")
    print(
        f"per-round ratio: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}); ratio of medians "
        f"{statistics.median(pkg) / statistics.median(bare):.3f}"
    )
    fpt, peak = record.get("flops_per_token"), record.get("peak_flops")
    if fpt and peak:
        print(
            f"MFU (measured {fpt / 1e6:,.2f} MFLOP/token, peak {peak / 1e12:,.2f} TFLOP/s "
            f"for {record.get('precision')}): package {fpt * statistics.median(pkg) / peak:.2%}, "
            f"bare {fpt * statistics.median(bare) / peak:.2%}; the last record (its clock also ran "
            f"through the interleaved bare steps): tokens_per_second "
            f"{record.get('tokens_per_second') or 0:,.0f}, mfu {record.get('mfu') or 0:.2%}"
        )
    print(
        f"per-round ratio of tokens per CPU-second (insensitive to other load): median "
        f"{statistics.median(cpu_ratios):.3f} (min {min(cpu_ratios):.3f}, max {max(cpu_ratios):.3f})"
    )
    print(f"ratio {statistics.median(ratios):.3f}")


def threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
