"""The host allocator setting (``host_allocator``, runtime.tune_host_allocator) on the bare
small_batch loop: page faults, kernel CPU time and peak memory per setting.

    python benchmarks/allocator.py [--rounds 2] [--steps 31] [--package] [overrides ...]

Each run is a fresh interpreter training ``--steps`` steps of the bare loop (benchmarks/_common.py)
with ``host_allocator=auto`` or ``system``, alternating. Printed per run: minor page faults and
kernel (sys) CPU seconds per step over the whole process (start-up included, the same for both),
and the peak resident memory. The speed gain is measured paired in throughput.py
(``--control --package host_allocator=system``); the figures here are counts, not timings.
``--package`` runs the package itself (``experiments.run``, the default logger and cadence, a
fresh study folder per run) instead of the bare loop: its own peak memory under each setting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import json, resource, sys
sys.path.insert(0, {here!r})
from _common import bare_train, compose, quiet_environment
quiet_environment()
c = compose(*{overrides!r})
if {package!r}:
    from batchsize_study.experiments import run
    tps = run(c)["tokens_per_second"]
else:
    tps = bare_train(c, warmup=1).tokens_per_second
ru = resource.getrusage(resource.RUSAGE_SELF)
print("RESULT " + json.dumps({{"tps": tps, "minflt": ru.ru_minflt,
      "sys": ru.ru_stime, "user": ru.ru_utime, "maxrss_mb": ru.ru_maxrss / 1024}}))
"""


def run(setting: str, steps: int, extra: list[str], package: bool = False) -> dict:
    overrides = [
        "experiment=small_batch",
        "lr=0.002",
        f"max_steps={steps}",
        "warmup_steps=3",
        f"study.dir={tempfile.mkdtemp(prefix='bench-allocator-')}",
        f"host_allocator={setting}",
        *extra,
    ]
    code = CHILD.format(here=str(HERE), overrides=overrides, package=package)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=31)
    ap.add_argument("--package", action="store_true", help="the package, not the bare loop")
    ap.add_argument("--settings", default="auto,system", help="comma-separated, in this order")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    settings = [x for x in args.settings.split(",") if x]
    got: dict[str, list[dict]] = {k: [] for k in settings}
    for r in range(args.rounds):
        for setting in settings if r % 2 == 0 else settings[::-1]:
            res = run(setting, args.steps, args.overrides, args.package)
            got[setting].append(res)
            print(
                f"round {r + 1} {setting:6s} page faults/step {res['minflt'] / args.steps:9,.0f}  "
                f"sys CPU/step {1e3 * res['sys'] / args.steps:5.1f} ms  user CPU/step "
                f"{1e3 * res['user'] / args.steps:5.0f} ms  peak RSS {res['maxrss_mb']:6.0f} MB  "
                f"({res['tps']:,.0f} tokens/s, unpaired)",
                flush=True,
            )
    med = {k: sorted(x["maxrss_mb"] for x in v)[len(v) // 2] for k, v in got.items()}
    flt = {k: sorted(x["minflt"] for x in v)[len(v) // 2] for k, v in got.items()}
    if set(got) != {"auto", "system"}:
        return
    print(
        f"page faults auto/system {flt['auto'] / flt['system']:.3f}; "
        f"peak RSS auto/system {med['auto'] / med['system']:.3f}"
    )


if __name__ == "__main__":
    main()
