"""Options that might pay: precision (bf16-mixed vs fp32), attention (SDPA vs eager) and
torch.compile, each measured on the same model, batch and data order.

    python benchmarks/options.py [--steps 30] [--warmup 5] [--rounds 2] [overrides ...]

The variants run round-robin, one optimizer step each in turn, in one process (the bare loop of
benchmarks/_common.py), so a machine shared with other work slows them alike; each is charged only
its own steps. torch.compile's one-off cost is reported separately as the extra time of its
warm-up steps over an uncompiled warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import bare_stepper, compose, quiet_environment

VARIANTS: dict[str, tuple[str, ...]] = {
    "fp32, sdpa": ("precision=32-true", "model.attn_implementation=sdpa"),
    "bf16-mixed, sdpa": ("precision=bf16-mixed", "model.attn_implementation=sdpa"),
    "bf16-mixed, eager": ("precision=bf16-mixed", "model.attn_implementation=eager"),
    "bf16-mixed, sdpa, compile": (
        "precision=bf16-mixed",
        "model.attn_implementation=sdpa",
        "compile=true",
    ),
}


def one_round(overrides: list[str], warmup: int, steps: int) -> dict[str, tuple[float, float]]:
    """{variant: (tokens/s over the measured steps, seconds of its warm-up steps)}."""
    steppers = {
        name: bare_stepper(compose(*overrides, f"max_steps={warmup + steps}", *extra))
        for name, extra in VARIANTS.items()
    }
    spent = dict.fromkeys(steppers, 0.0)
    warm = dict.fromkeys(steppers, 0.0)
    tokens = dict.fromkeys(steppers, 0)
    for step in range(1, warmup + steps + 1):
        for name, it in steppers.items():
            t0 = time.perf_counter()
            n = next(it)
            dt = time.perf_counter() - t0
            if step <= warmup:
                warm[name] += dt
            else:
                spent[name] += dt
                tokens[name] += n
    return {name: (tokens[name] / spent[name], warm[name]) for name in steppers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--no-compile", action="store_true", help="skip the compile variant (slow to build)"
    )
    ap.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides (model=..., batch_size=...)"
    )
    args = ap.parse_args()
    quiet_environment()
    base = ["experiment=superconvergence", "lr=0.002", *args.overrides]
    if args.no_compile:
        VARIANTS.pop("bf16-mixed, sdpa, compile")
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in VARIANTS}
    for r in range(args.rounds):
        for name, got in one_round(base, args.warmup, args.steps).items():
            results[name].append(got)
        print(f"round {r + 1} done", flush=True)
    ref = statistics.median(t for t, _ in results["fp32, sdpa"])
    ref_warm = statistics.median(w for _, w in results["bf16-mixed, sdpa"])
    for name, rows in results.items():
        tps = [t for t, _ in rows]
        warm = statistics.median(w for _, w in rows)
        print(
            f"{name:28s} {statistics.median(tps):9,.0f} tok/s (min {min(tps):,.0f}, max "
            f"{max(tps):,.0f}); x{statistics.median(tps) / ref:.2f} vs fp32; warm-up "
            f"{warm:.1f}s ({warm - ref_warm:+.1f}s vs uncompiled bf16)"
        )


if __name__ == "__main__":
    main()
