"""Training throughput of the runs that matter: small_batch and large_batch as the study runs them,
against a bare PyTorch loop doing the same arithmetic.

    python benchmarks/throughput.py [--rounds 3] [--steps 101] [--warmup 1]
                                    [--large-steps 101] [--large-warmup 1] [--threads 0]
                                    [--design paired|rounds] [--segment 10] [--control]
                                    [--staggered-start] [--bare-noise]
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
(b) bare: the same model class, AdamW groups, schedule, clipping, autocast, host allocator
    setting, micro batch and accumulation, sampler order, validation windows and checkpoint
    cadence (benchmarks/_common.py ``bare_stepper``), nothing else: no noise scale, no logging.
    ``--bare-noise``: it also does the noise scale's arithmetic (small_batch's split steps, the
    per-parameter squared norms on every step that holds two batch sizes, the EMAs), so the ratio
    prices the package alone, not the measurement.

Each side runs in its own fresh interpreter. ``--design paired`` (the default): in each round both
interpreters start together (start-up untimed), then run in alternating segments of ``--segment``
optimizer steps; while one side runs, every process of the other (wandb's service included) is
stopped with SIGSTOP, so no thread of it runs while this side is timed, and a machine whose speed
drifts within the round slows both sides alike. A side's time is the sum of its segments (each
from its resume to the end of its last step, validations and checkpoints in between included).
``--design rounds``: one whole run per side, one after the other (the earlier design: run-wide
speed swings of this VM, up to 15 %, land on one side only). The side that goes first alternates
between rounds. ``--control`` runs the bare loop on both sides (an A/A test): the ratios it prints
are the design's own noise floor.

Prints tokens/s per experiment (median, min..max over rounds), the per-round ratios package/bare
(with each segment's ratio), CPU time, page faults and context switches per step for each side,
and as the last line ``ratio R``: the lower of the two experiments' median per-round ratios. Also
printed: the ratio of the median step (one step's interval, median over the timed steps): the
per-step overhead alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from _common import compose, median_spread, quiet_environment

EXPERIMENTS = ("small_batch", "large_batch")
# getrusage fields summed over a side's timed segments: CPU seconds (all threads), minor page
# faults, voluntary and involuntary context switches.
USAGE = ("ru_utime", "ru_stime", "ru_minflt", "ru_nvcsw", "ru_nivcsw")
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


class Segments:
    """The worker's half of the paired design: at each boundary step it reports to the parent
    and blocks until told to go on, so only the time between a resume and the next boundary
    counts. Without a control pipe (``--design rounds``) there is one segment, from the end of
    step ``warmup`` to the last step."""

    def __init__(self, warmup: int, last: int, every: int, ctl_fd: int, go_fd: int) -> None:
        self.warmup, self.last, self.every = warmup, last, every
        self.ctl = os.fdopen(ctl_fd, "w", buffering=1) if ctl_fd >= 0 else None
        self.go = os.fdopen(go_fd, "r") if go_fd >= 0 else None
        self.start: float | None = None
        self.prev: float | None = None
        self.seconds: list[float] = []  # one per segment
        self.intervals: list[float] = []  # one per timed step (resume -> end, or end -> end)
        self.usage = dict.fromkeys(USAGE, 0.0)  # this process's resource use in its segments
        self.usage0: resource.struct_rusage | None = None

    def boundary(self, step: int) -> bool:
        if step < self.warmup:
            return False
        if step in (self.warmup, self.last):
            return True
        return self.ctl is not None and (step - self.warmup) % self.every == 0

    def mark(self, step: int) -> None:
        """Called at the end of every optimizer step (after the device sync, where there is one)."""
        now = time.perf_counter()
        if self.prev is not None:
            self.intervals.append(now - self.prev)
            self.prev = now
        if not self.boundary(step):
            return
        if self.start is not None:
            self.seconds.append(now - self.start)
            ru = resource.getrusage(resource.RUSAGE_SELF)
            for k in USAGE:
                self.usage[k] += getattr(ru, k) - getattr(self.usage0, k)
        if step == self.last and self.ctl is None:
            return
        if self.ctl is not None:
            self.ctl.write(f"PAUSE {step}\n")
            if not self.go.readline():  # the parent freezes this process tree in between
                raise SystemExit("benchmark parent went away")
        self.usage0 = resource.getrusage(resource.RUSAGE_SELF)
        self.start = self.prev = time.perf_counter() if step < self.last else None

    def report(self, tokens_per_step: int) -> dict:
        seconds = sum(self.seconds)
        steps = self.last - self.warmup
        return {
            "tokens_per_second": tokens_per_step * steps / seconds,
            "step_tokens_per_second": tokens_per_step / statistics.median(self.intervals),
            "timed_steps": steps,
            "seconds": seconds,
            "segment_seconds": self.seconds,
            "usage": self.usage,
        }

    def result(self, payload: dict) -> None:
        line = "RESULT " + json.dumps(payload)
        if self.ctl is not None:
            self.ctl.write(line + "\n")
        print(line, flush=True)


def worker(
    side: str, overrides: list[str], warmup: int, seg: Segments, bare_noise: bool = False
) -> dict:
    """One side, in this interpreter: tokens/s over its timed segments after step ``warmup``."""
    import torch

    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp:
        c = compose(*overrides, f"study.dir={tmp}")
        seg.last = c.max_steps
        t0 = time.perf_counter()
        if side == "bare":
            from _common import bare_stepper, resolved_micro_batch

            c = resolved_micro_batch(c)  # auto: the number the package side resolves it to
            # The device is synchronised only where the clock is read (the package's recorder
            # syncs once per logger.log_every_steps and always at the last step).
            sync = {s for s in range(1, c.max_steps + 1) if seg.boundary(s)}
            stepper = bare_stepper(
                c, ckpt_dir=tmp, validate=True, sync_steps=sync, noise=bare_noise
            )
            for step, _ in enumerate(stepper, start=1):
                seg.mark(step)
            tokens_per_step = c.batch_size * c.model.seq_len
            extra = {"micro_batch_size": c.micro_batch_size}
        else:
            from batchsize_study.experiments import run
            from batchsize_study.recorder import StepRecorder

            original = StepRecorder.on_train_batch_end
            seen = {0}

            def timed(self, trainer, *args, **kwargs):  # noqa: ANN001, ANN202
                original(self, trainer, *args, **kwargs)
                step = trainer.global_step
                if step in seen:  # a micro-batch before the step's optimizer step
                    return
                seen.add(step)
                if seg.boundary(step) and torch.cuda.is_available():
                    torch.cuda.synchronize()  # a segment's clock must see the device done
                seg.mark(step)

            StepRecorder.on_train_batch_end = timed  # type: ignore[method-assign]
            try:
                record = run(c)
            finally:
                StepRecorder.on_train_batch_end = original  # type: ignore[method-assign]
            tokens_per_step = record["tokens_per_step"]
            extra = {
                k: record.get(k)
                for k in (
                    "status",
                    "precision",
                    "micro_batch_size",
                    "flops_per_token",
                    "peak_flops",
                    "mfu",
                )
            }
            extra["noise_steps"] = ((record.get("noise") or {}).get("run_mean") or {}).get("steps")
        wall = time.perf_counter() - t0
    return {
        "side": side,
        **seg.report(tokens_per_step),
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        **extra,
    }


def _command(side: str, overrides: list[str], warmup: int, threads: int) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", side, "--warmup", str(warmup)]
    return cmd + ["--threads", str(threads), *overrides]


def spawn_cmd(side: str, cmd: list[str]) -> dict:
    """``--design rounds``: one side in a fresh interpreter, alone; its last stdout line is the
    JSON result."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def usage_line(res: dict) -> str:
    """CPU use per timed step: user and system seconds, page faults, context switches."""
    u, n = res["usage"], res["timed_steps"]
    return (
        f"; per step: cpu {1e3 * u['ru_utime'] / n:.0f}+{1e3 * u['ru_stime'] / n:.0f} ms "
        f"(user+sys), {u['ru_minflt'] / n:,.0f} page faults, {u['ru_nvcsw'] / n:.0f} voluntary "
        f"+ {u['ru_nivcsw'] / n:.0f} forced switches"
    )


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (wandb's service runs in its own session, so a process
    group would miss it), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


class PairedSide:
    """One side of a paired round: a worker process tree the parent runs one segment at a time
    and freezes (SIGSTOP on every process, so none of its threads runs) while the other side is
    timed."""

    def __init__(self, side: str, cmd: list[str], log_dir: str) -> None:
        ctl_r, ctl_w = os.pipe()
        go_r, go_w = os.pipe()
        self.side = side
        self.log = open(os.path.join(log_dir, f"{side}.log"), "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*cmd, "--ctl-fd", str(ctl_w), "--go-fd", str(go_r)],
            pass_fds=(ctl_w, go_r),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
        os.close(ctl_w)
        os.close(go_r)
        self.ctl = os.fdopen(ctl_r, "r")
        self.go = os.fdopen(go_w, "w", buffering=1)
        self.step = 0
        self.result: dict | None = None

    def wait_pause(self) -> None:
        """Until the worker reports a boundary (or its result); then freeze its whole tree."""
        line = self.ctl.readline()
        if line.startswith("RESULT "):
            self.result = json.loads(line[len("RESULT ") :])
            self.proc.wait()
            return
        if not line.startswith("PAUSE "):
            self.proc.wait()
            self.log.seek(0)
            sys.exit(
                f"{self.side} failed (exit {self.proc.returncode}):\n{self.log.read()[-3000:]}"
            )
        self.step = int(line.split()[1])
        self.frozen = _process_tree(self.proc.pid)
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while any(_state(p) not in "TtXZ" for p in self.frozen) and time.monotonic() < deadline:
            time.sleep(0.001)

    def resume(self) -> None:
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.go.write("go\n")

    def kill(self) -> None:
        if self.proc.poll() is not None:
            return
        for pid in _process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.proc.kill()
        self.proc.wait()


def paired(
    order: tuple[str, str], cmds: dict[str, list[str]], last: int, staggered: bool = False
) -> dict[str, dict]:
    """``--design paired``: both sides' processes alive, run in alternating segments of
    ``--segment`` steps, the other frozen, so a machine whose speed drifts within a run slows
    both alike. Start-up and the untimed warm-up run one side at a time; so does the teardown
    after the last step, untimed."""
    with tempfile.TemporaryDirectory(prefix="bench-paired-") as logs:
        sides = {}
        try:
            # Start-up, untimed, both at once, each to its first boundary. Started one after
            # the other (``staggered``), the first interpreter ran slower for the whole round in
            # most A/A rounds (benchmarks/README.md section 1): kept as an option to show it.
            for name in order:
                sides[name] = PairedSide(name, cmds[name], logs)
                if staggered:
                    sides[name].wait_pause()
            for name in order:
                if not staggered:
                    sides[name].wait_pause()
            while any(s.step < last for s in sides.values()):
                for name in order:
                    s = sides[name]
                    if s.step < last:
                        s.resume()
                        s.wait_pause()
            for name in order:  # teardown (final validation, wandb finish), untimed
                sides[name].resume()
                sides[name].wait_pause()
                if sides[name].result is None:
                    sys.exit(f"{name}: no result after its last step")
        finally:
            for s in sides.values():
                s.kill()
        return {name: s.result for name, s in sides.items()}


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
    ap.add_argument(
        "--design",
        choices=("paired", "rounds"),
        default="paired",
        help="paired: both sides alive, alternating segments, the other frozen; rounds: one "
        "whole run per side, one after the other",
    )
    ap.add_argument(
        "--segment", type=int, default=10, help="steps per segment in the paired design"
    )
    ap.add_argument(
        "--control",
        action="store_true",
        help="run the bare loop on both sides (an A/A test): the design's own noise floor",
    )
    ap.add_argument(
        "--bare-noise",
        action="store_true",
        help="the bare loop also does the noise scale's arithmetic (split steps, per-parameter "
        "norms, EMAs) without the package's machinery: the ratio then prices the package alone",
    )
    ap.add_argument(
        "--staggered-start",
        action="store_true",
        help="paired design: start the second interpreter only once the first is paused",
    )
    ap.add_argument("--worker", choices=("package", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--ctl-fd", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--go-fd", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (model=..., precision=...)")
    args = ap.parse_args()
    quiet_environment()
    # Killed, the parent still runs paired()'s clean-up: no worker is left stopped (SIGSTOP).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"{sys.argv[0]}: terminated"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        seg = Segments(args.warmup, 0, args.segment, args.ctl_fd, args.go_fd)
        seg.result(worker(args.worker, args.overrides, args.warmup, seg, args.bare_noise))
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
                "as the micro batch auto resolves to on each side (printed by each run)"
                if c.micro_batch_size == "auto"
                else f"hooks on every step's {c.batch_size // c.micro_batch_size} micro-batches"
                if c.batch_size > c.micro_batch_size
                else f"split {c.noise.split} every {c.noise.split_every} steps"
            ),
            flush=True,
        )
    if args.control:
        print("CONTROL: the bare loop on both sides (labelled package and bare)", flush=True)
    if args.package:
        print(f"package side only: {' '.join(args.package)}", flush=True)
    if args.bare_noise:
        print("bare loop: does the noise scale's arithmetic too (--bare-noise)", flush=True)
    if args.design == "paired":
        print(
            f"{args.rounds} rounds; in each, both sides' interpreters alive, run in alternating "
            f"segments of {args.segment} steps with the other side's processes frozen (SIGSTOP); "
            "the side that goes first alternates; start-up "
            + ("one after the other (staggered)" if args.staggered_start else "together"),
            flush=True,
        )
    else:
        print(f"{args.rounds} rounds, each side in its own interpreter, order alternating")
    tps: dict[str, dict[str, list[float]]] = {e: {"package": [], "bare": []} for e in experiments}
    ratios: dict[str, list[float]] = {e: [] for e in experiments}
    step_ratios: dict[str, list[float]] = {e: [] for e in experiments}
    last: dict = {}
    for r in range(args.rounds):
        order = ("package", "bare") if r % 2 == 0 else ("bare", "package")
        for exp in experiments:
            steps, warmup = plans[exp]
            cmds = {}
            for side in order:
                extra = [*args.overrides, *(args.package if side == "package" else [])]
                overrides = run_overrides(exp, steps, extra, args.cadence)
                runs = "bare" if args.control else side
                cmds[side] = _command(runs, overrides, warmup, args.threads)
                cmds[side] += ["--segment", str(args.segment)]
                if args.bare_noise:
                    cmds[side].append("--bare-noise")
            if args.design == "paired":
                got = paired(order, cmds, steps, args.staggered_start)
            else:
                got = {side: spawn_cmd(side, cmds[side]) for side in order}
            for side in order:
                res = got[side]
                tps[exp][side].append(res["tokens_per_second"])
                print(
                    f"round {r + 1} {exp:11s} {side:7s} {res['tokens_per_second']:9,.0f} tok/s "
                    f"({res['timed_steps']} steps in {res['seconds']:.1f}s, "
                    f"{len(res['segment_seconds'])} segments; process {res['wall_s']:.1f}s)"
                    + usage_line(res),
                    flush=True,
                )
            pairs = zip(got["package"]["segment_seconds"], got["bare"]["segment_seconds"])
            seg_ratios = [b / p for p, b in pairs]
            ratios[exp].append(
                got["package"]["tokens_per_second"] / got["bare"]["tokens_per_second"]
            )
            step_ratios[exp].append(
                got["package"]["step_tokens_per_second"] / got["bare"]["step_tokens_per_second"]
            )
            last[exp] = got["package"]
            print(
                f"round {r + 1} {exp:11s} ratio {ratios[exp][-1]:.3f} (median step "
                f"{step_ratios[exp][-1]:.3f}"
                + (
                    "; per segment " + " ".join(f"{x:.3f}" for x in seg_ratios)
                    if len(seg_ratios) > 1
                    else ""
                )
                + ")",
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
