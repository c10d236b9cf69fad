"""Training throughput of the runs that matter: small_batch and large_batch as the study runs them,
against a bare PyTorch loop doing the same arithmetic.

    python benchmarks/throughput.py [--rounds 3] [--steps 101] [--warmup 1]
                                    [--large-steps 101] [--large-warmup 1] [--threads 0]
                                    [--cadence default|scaled]
                                    [--package OVERRIDE ...] [overrides ...]

(a) package: ``experiments.run`` with experiment=small_batch / large_batch and the default config:
    Trainer, module, data module, the recorder, the detector, the noise-scale hooks (and on
    small_batch its split steps), checkpoints and validation, wandb offline, progress bar.
    ``--cadence default`` (the default) keeps the run's own cadence (a validation every 50 and a
    checkpoint every 100 steps): the 100 timed steps hold 2 validations and 1 checkpoint, the
    default 300-step run's 6 and 3 per 300. ``--cadence scaled`` squeezes the 300-step run's 6
    validations and 3 checkpoints into the benchmark's length: far more of them per step than any
    real run, a pessimistic ratio from shorter runs.
(b) bare: the same model class, AdamW groups, schedule, clipping, autocast, micro batch and
    accumulation, sampler order, validation windows and checkpoint cadence (benchmarks/_common.py
    ``bare_stepper``), nothing else: no noise scale, no logging.

Each side runs in its own fresh interpreter (so neither sees the other's threads), one after the
other, A B then B A in the next round, so a machine shared with other work slows both alike.
Each side is timed by the wall clock from the end of step ``warmup`` to the end of the last step
(validation and checkpoints in between count; start-up does not). Prints tokens/s per experiment
(median, min..max over rounds), the per-round ratios package/bare, and as the last line
``ratio R``: the lower of the two experiments' median per-round ratios. Also printed: the ratio of
the median step (one step's interval, median over the timed steps): the per-step overhead alone,
robust to a machine whose speed drifts within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import compose, median_spread, quiet_environment

EXPERIMENTS = ("small_batch", "large_batch")
# The default run's cadence (config.py): 300 steps, a checkpoint every 100, a validation every 50.
DEFAULT_STEPS, CKPT_EVERY, VAL_EVERY = 300, 100, 50


def run_overrides(experiment: str, steps: int, extra: list[str], cadence: str) -> list[str]:
    """The study's own config for ``experiment``, shortened to ``steps``; with ``scaled`` cadence
    the default run's validations and checkpoints are squeezed into those steps."""
    scaled = (
        [
            f"val_every_steps={max(1, round(steps * VAL_EVERY / DEFAULT_STEPS))}",
            f"checkpoint_every_steps={max(1, round(steps * CKPT_EVERY / DEFAULT_STEPS))}",
        ]
        if cadence == "scaled"
        else []
    )
    return [
        f"experiment={experiment}",
        "lr=0.002",  # given: no upstream record needed; the arithmetic does not depend on it
        "force=true",
        f"max_steps={steps}",
        f"warmup_steps={max(1, steps // 10)}",
        *scaled,
        *extra,
    ]


def window_events(first: int, last: int, every: int) -> int:
    """Events (validations, checkpoints) after steps ``first`` .. ``last - 1``: what a window
    timed from the end of step ``first`` to the end of step ``last`` holds on both sides."""
    return sum(1 for s in range(first, last) if every >= 1 and s % every == 0)


def worker(side: str, overrides: list[str], warmup: int) -> dict:
    """One side, in this interpreter: tokens/s from the end of step ``warmup`` to the last step."""
    import torch

    marks: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp:
        c = compose(*overrides, f"study.dir={tmp}")
        t0 = time.perf_counter()
        if side == "bare":
            from _common import bare_stepper

            # The device is synchronised only where the clock is read (the package's recorder
            # syncs once per logger.log_every_steps and always at the last step).
            stepper = bare_stepper(c, ckpt_dir=tmp, validate=True, sync_steps={warmup, c.max_steps})
            for step, _ in enumerate(stepper, start=1):
                marks[step] = time.perf_counter()
            tokens_per_step = c.batch_size * c.model.seq_len
            extra = {}
        else:
            from batchsize_study.experiments import run
            from batchsize_study.recorder import StepRecorder

            original = StepRecorder.on_train_batch_end

            def timed(self, trainer, *args, **kwargs):  # noqa: ANN001, ANN202
                original(self, trainer, *args, **kwargs)
                if trainer.global_step == warmup and torch.cuda.is_available():
                    torch.cuda.synchronize()  # the clock's start must see the device done
                marks.setdefault(trainer.global_step, time.perf_counter())

            StepRecorder.on_train_batch_end = timed  # type: ignore[method-assign]
            try:
                record = run(c)
            finally:
                StepRecorder.on_train_batch_end = original  # type: ignore[method-assign]
            tokens_per_step = record["tokens_per_step"]
            extra = {
                k: record.get(k)
                for k in ("status", "precision", "flops_per_token", "peak_flops", "mfu")
            }
            extra["noise_steps"] = ((record.get("noise") or {}).get("run_mean") or {}).get("steps")
        wall = time.perf_counter() - t0
    last = max(marks)
    seconds = marks[last] - marks[warmup]
    # One interval per timed step; the median is the plain training step (the steps followed
    # by a validation or a checkpoint are the slow tail), and robust to a few seconds of a
    # slower machine, which the window's total is not.
    steps = [s for s in sorted(marks) if warmup <= s <= last]
    intervals = [marks[b] - marks[a] for a, b in zip(steps, steps[1:]) if b == a + 1]
    return {
        "side": side,
        "tokens_per_second": tokens_per_step * (last - warmup) / seconds,
        "step_tokens_per_second": tokens_per_step / statistics.median(intervals),
        "timed_steps": last - warmup,
        "seconds": seconds,
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        **extra,
    }


def spawn(side: str, overrides: list[str], warmup: int, threads: int) -> dict:
    """Run one side in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, "--worker", side, "--warmup", str(warmup)]
    cmd += ["--threads", str(threads), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=101, help="small_batch optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed small_batch steps per run")
    ap.add_argument("--large-steps", type=int, default=101, help="large_batch steps per run")
    ap.add_argument("--large-warmup", type=int, default=1, help="untimed large_batch steps")
    ap.add_argument(
        "--cadence",
        choices=("default", "scaled"),
        default="default",
        help="validation/checkpoint cadence: the run's own, or the 300-step run's squeezed in",
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS))
    ap.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="an override for the package side only (e.g. noise.enabled=false, to price a feature)",
    )
    ap.add_argument("--worker", choices=("package", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (model=..., precision=...)")
    args = ap.parse_args()
    quiet_environment()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        result = worker(args.worker, args.overrides, args.warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return

    plans = {
        "small_batch": (args.steps, args.warmup),
        "large_batch": (args.large_steps, args.large_warmup),
    }
    experiments = [e for e in args.experiments.split(",") if e]
    for exp in experiments:
        steps, warmup = plans[exp]
        c = compose(*run_overrides(exp, steps, args.overrides, args.cadence), "study.dir=/tmp/u")
        vals = window_events(warmup, steps, c.val_every_steps)
        ckpts = window_events(warmup, steps, c.checkpoint_every_steps)
        print(
            f"{exp}: model {c.model.arch} h{c.model.hidden_size} L{c.model.num_layers} seq "
            f"{c.model.seq_len}, batch {c.batch_size} (micro {c.micro_batch_size}), precision "
            f"{c.precision}, compile {c.compile}; {steps} steps ({warmup} untimed), validation "
            f"every {c.val_every_steps}, checkpoint every {c.checkpoint_every_steps} ({args.cadence}"
            f" cadence: {vals} validations and {ckpts} checkpoints in the {steps - warmup} timed "
            f"steps; a default run: {(steps - warmup) / VAL_EVERY:.1f} and "
            f"{(steps - warmup) / CKPT_EVERY:.1f}); noise: "
            + (
                f"hooks on every step's {c.batch_size // c.micro_batch_size} micro-batches"
                if c.batch_size > c.micro_batch_size
                else f"split {c.noise.split} every {c.noise.split_every} steps"
            ),
            flush=True,
        )
    if args.package:
        print(f"package side only: {' '.join(args.package)}", flush=True)
    print(f"{args.rounds} rounds, each side in its own interpreter, order alternating", flush=True)
    tps: dict[str, dict[str, list[float]]] = {e: {"package": [], "bare": []} for e in experiments}
    ratios: dict[str, list[float]] = {e: [] for e in experiments}
    step_ratios: dict[str, list[float]] = {e: [] for e in experiments}
    last: dict = {}
    for r in range(args.rounds):
        order = ("package", "bare") if r % 2 == 0 else ("bare", "package")
        for exp in experiments:
            steps, warmup = plans[exp]
            got = {}
            for side in order:
                extra = [*args.overrides, *(args.package if side == "package" else [])]
                overrides = run_overrides(exp, steps, extra, args.cadence)
                res = spawn(side, overrides, warmup, args.threads)
                got[side] = res
                tps[exp][side].append(res["tokens_per_second"])
                print(
                    f"round {r + 1} {exp:11s} {side:7s} {res['tokens_per_second']:9,.0f} tok/s "
                    f"({res['timed_steps']} steps in {res['seconds']:.1f}s; process "
                    f"{res['wall_s']:.1f}s)",
                    flush=True,
                )
            ratios[exp].append(
                got["package"]["tokens_per_second"] / got["bare"]["tokens_per_second"]
            )
            step_ratios[exp].append(
                got["package"]["step_tokens_per_second"] / got["bare"]["step_tokens_per_second"]
            )
            last[exp] = got["package"]
            print(
                f"round {r + 1} {exp:11s} ratio {ratios[exp][-1]:.3f} (median step "
                f"{step_ratios[exp][-1]:.3f})",
                flush=True,
            )
    print()
    per_exp = {}
    for exp in experiments:
        per_exp[exp] = statistics.median(ratios[exp])
        print(f"{exp}: bare    tokens/s {median_spread(tps[exp]['bare'])}")
        print(f"{exp}: package tokens/s {median_spread(tps[exp]['package'])}")
        print(
            f"{exp}: per-round ratio package/bare "
            + ", ".join(f"{x:.3f}" for x in ratios[exp])
            + f"; median {per_exp[exp]:.3f}"
        )
        print(
            f"{exp}: per-round ratio of the median step (the plain training step, no validation "
            "or checkpoint) "
            + ", ".join(f"{x:.3f}" for x in step_ratios[exp])
            + f"; median {statistics.median(step_ratios[exp]):.3f}"
        )
        rec = last[exp]
        if rec.get("flops_per_token") and rec.get("peak_flops"):
            fpt, peak = rec["flops_per_token"], rec["peak_flops"]
            print(
                f"{exp}: MFU ({fpt / 1e6:,.2f} MFLOP/token, peak {peak / 1e12:,.3f} TFLOP/s for "
                f"{rec.get('precision')}): package {fpt * statistics.median(tps[exp]['package']) / peak:.2%}, "
                f"bare {fpt * statistics.median(tps[exp]['bare']) / peak:.2%}; noise measured on "
                f"{rec.get('noise_steps')} steps"
            )
    print(f"ratio {min(per_exp.values()):.3f}")


if __name__ == "__main__":
    main()
