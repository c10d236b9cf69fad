"""The destabilisation detector's cost per optimizer step, against the step it watches.

    python benchmarks/detector.py [--steps 10] [overrides ...]

Why a micro-measurement and not two end-to-end runs: the detector's work is microseconds per step,
far below the run-to-run noise of a shared 2-core machine, so an A/B of whole runs cannot resolve
it. Instead: (1) the DestabilisationCallback's hook is timed over 10,000 realistic steps (a loss
curve that falls, then rises), with the Lightning strategy call it makes; (2) a training step of
the same config is timed with the bare loop; the overhead is (1)/(2). By construction the detector
adds no device-to-host sync: it receives host floats from the StepRecorder's one transfer per
``logger.log_every_steps`` (on a GPU, ``gpu.sh`` runs with the default logging interval).
"""

from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

from _common import bare_train, compose, quiet_environment

from batchsize_study.spike import DestabilisationCallback, DestabilisationDetector


def hook_seconds_per_step(n: int = 10_000) -> float:
    """Seconds per step of DestabilisationCallback.on_step_rows, one row per call (the default
    ``log_every_steps=1``: the most calls)."""
    cfg = compose().detector
    cb = DestabilisationCallback(DestabilisationDetector.from_config(cfg), stop_on_rise=False)
    strategy = SimpleNamespace(reduce_boolean_decision=lambda d, all=True: d)  # single device
    trainer = SimpleNamespace(strategy=strategy, should_stop=False)
    rows = [
        {
            "step": s,
            "lr": 1e-3 * s / n,
            # falls like a training loss, then rises after 80 % of the run
            "train_loss": 3.0
            + 5.0 * math.exp(-s / 500)
            + (0.002 * (s - 0.8 * n) if s > 0.8 * n else 0.0),
        }
        for s in range(1, n + 1)
    ]
    t0 = time.perf_counter()
    for row in rows:
        cb.on_step_rows(trainer, [row])
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="bare-loop steps timed")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    quiet_environment()
    per_hook = min(hook_seconds_per_step() for _ in range(3))
    c = compose(
        "experiment=superconvergence", "lr=0.002", f"max_steps={args.steps + 3}", *args.overrides
    )
    t = bare_train(c, 3)
    step_s = t.seconds / args.steps
    print(f"detector hook: {per_hook * 1e6:.1f} us per optimizer step (best of 3 x 10,000 steps)")
    print(
        f"training step ({c.model.arch} h{c.model.hidden_size} L{c.model.num_layers}, batch {c.batch_size}): {step_s * 1e3:.1f} ms"
    )
    print(
        f"detector overhead: {per_hook / step_s:.5%} of a step ({per_hook / step_s * 1e6:.1f} ppm)"
    )


if __name__ == "__main__":
    main()
