"""CPU and wall time of one wandb log call, offline, as the StepRecorder's logger thread makes it.

    python benchmarks/wandb_log.py [--calls 1000]

Lightning's ``WandbLogger.log_metrics`` and wandb's ``run.log`` with the recorder's six per-step
keys, after 20 warm-up calls; wandb runs offline into a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import quiet_environment

ROW = {
    "train/loss": 4.0,
    "train/lr": 1e-3,
    "train/grad_norm": 0.5,
    "tokens_seen": 1000,
    "throughput/tokens_per_second": 1e4,
    "throughput/mfu": 0.07,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    n = ap.parse_args().calls
    quiet_environment()
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    with tempfile.TemporaryDirectory(prefix="bench-wandb-") as tmp:
        logger = WandbLogger(project="bench", save_dir=tmp, offline=True)
        run = logger.experiment
        for i in range(20):
            logger.log_metrics(ROW, step=i)
        calls = {
            "WandbLogger.log_metrics": lambda i: logger.log_metrics(ROW, step=i),
            "wandb run.log": lambda i: run.log(ROW, step=i),
        }
        step = 20
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(step, step + n):
                call(i)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            step += n
            print(
                f"{name}: {wall / n * 1e6:.0f} us wall, {cpu / n * 1e6:.0f} us CPU per call ({n} calls)"
            )
        wandb.finish()


if __name__ == "__main__":
    main()
