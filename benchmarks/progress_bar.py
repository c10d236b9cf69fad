"""What the progress bar costs a CPU run, seen the way a user sees it: in a terminal.

    python benchmarks/progress_bar.py [--rounds 3] [--steps 101] [overrides ...]

Runs ``experiment=small_batch`` (the default model, the run's own cadence) in a pseudo-terminal,
so the bar really draws, with three bars, rotating their order each round:

- ``lightning``: Lightning's default ``RichProgressBar()`` (``refresh_rate=100``: redrawn after
  every batch), configured as ``+callbacks.bar._target_=...RichProgressBar``;
- ``study``: the package's bar (``batchsize_study/progress.py``: twice a second, loss and LR read
  from the recorder);
- ``off``: ``trainer.enable_progress_bar=false``.

Reported per run: the time Rich spent redrawing (every ``rich.live.Live.refresh``, timed inside
the run: the bar's own cost, without the thread wake-ups and GIL hand-overs around it) as a
share of the run, the record's ``tokens_per_second`` (the median over the training steps'
intervals, validation excluded) and the run's wall time; per round, each bar's ratio to ``off``.
The redraw share is the robust figure: it is measured inside one run, while the tokens/s ratio
compares runs on a machine whose speed drifts. Last line: the median ratio of each bar.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import quiet_environment

# Runs the package with Rich's redraws timed; prints their count and total time at exit.
TIMED_MAIN = """
import atexit, runpy, sys, time
import rich.live
done = [0, 0.0]
refresh = rich.live.Live.refresh
def timed(self):
    t = time.perf_counter()
    refresh(self)
    done[0] += 1
    done[1] += time.perf_counter() - t
rich.live.Live.refresh = timed
start = time.perf_counter()
atexit.register(lambda: print(f"BAR_REDRAWS {done[0]} {done[1]:.4f} {time.perf_counter() - start:.3f}"))
sys.argv = ["batchsize_study", *sys.argv[1:]]
runpy.run_module("batchsize_study", run_name="__main__", alter_sys=True)
"""

VARIANTS = {
    "lightning": ["+callbacks.bar._target_=lightning.pytorch.callbacks.RichProgressBar"],
    "study": [],
    "off": ["trainer.enable_progress_bar=false"],
}


def run_in_pty(argv: list[str]) -> tuple[int, bytes]:
    """Run ``argv`` with a pseudo-terminal as its stdin/stdout/stderr; return (status, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        os.execvp(argv[0], argv)
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), bytes(out)


def one_run(variant: str, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bar-{variant}-") as tmp:
        argv = [
            sys.executable,
            "-c",
            TIMED_MAIN,
            "experiment=small_batch",
            "lr=0.002",
            "force=true",
            f"max_steps={steps}",
            f"warmup_steps={max(1, steps // 10)}",
            f"study.dir={tmp}",
            *VARIANTS[variant],
            *extra,
        ]
        t0 = time.perf_counter()
        rc, out = run_in_pty(argv)
        wall = time.perf_counter() - t0
        records = list(Path(tmp).glob("runs/*/result.json"))
        if rc or not records:
            sys.exit(f"{variant} failed (exit {rc}):\n{out[-3000:].decode(errors='replace')}")
        record = json.loads(records[0].read_text())
    line = [ln for ln in out.decode(errors="replace").splitlines() if "BAR_REDRAWS" in ln][-1]
    redraws, redraw_s, run_s = line.split("BAR_REDRAWS", 1)[1].split()
    return {
        "tokens_per_second": record["tokens_per_second"],
        "wall_s": wall,
        "bytes": len(out),
        "redraws": int(redraws),
        "redraw_share": float(redraw_s) / float(run_s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=101)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    quiet_environment()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    names = list(VARIANTS)
    ratios: dict[str, list[float]] = {n: [] for n in names if n != "off"}
    shares: dict[str, list[float]] = {n: [] for n in names}
    print(
        f"small_batch, {args.steps} steps, in a pseudo-terminal; {args.rounds} rounds", flush=True
    )
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        got = {}
        for name in order:
            got[name] = res = one_run(name, args.steps, args.overrides)
            shares[name].append(res["redraw_share"])
            print(
                f"round {r + 1} {name:9s} {res['redraws']:5d} redraws, {res['redraw_share']:.2%} of "
                f"the run; {res['tokens_per_second']:9,.0f} tok/s (record, median step); run "
                f"{res['wall_s']:.1f}s; {res['bytes']:,} bytes to the terminal",
                flush=True,
            )
        for name in ratios:
            ratios[name].append(got[name]["tokens_per_second"] / got["off"]["tokens_per_second"])
        print(
            f"round {r + 1} ratio to off: " + ", ".join(f"{n} {ratios[n][-1]:.3f}" for n in ratios),
            flush=True,
        )
    for name, xs in ratios.items():
        print(f"{name}: per-round ratio to off " + ", ".join(f"{x:.3f}" for x in xs))
    print(
        "median share of the run spent redrawing: "
        + ", ".join(f"{n} {statistics.median(x):.2%}" for n, x in shares.items())
    )
    print(
        "median ratio to off: "
        + ", ".join(f"{n} {statistics.median(x):.3f}" for n, x in ratios.items())
    )


if __name__ == "__main__":
    main()
