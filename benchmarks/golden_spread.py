"""How far the golden smoke study's numbers move between fp32 CPU kernels: the measurement
behind tests/test_golden.py's pinned kernels and tolerance.

    python benchmarks/golden_spread.py [--variants baseline,no_mkldnn,...] [--save DIR]

Why: fp32 on one CPU and one build is deterministic, but another CPU kind runs other kernels
(MKL picks its code path by instruction set and vendor, PyTorch's own kernels by the CPU
capability: AVX-512, AVX2 or default; oneDNN by ISA; the thread count may split reductions), so
sums are taken in another order, and 40 training steps amplify the last bits. The golden test
must pass on any CPU kind; this measures what each of those choices does to its snapshot.

Each variant builds the smoke study exactly as the golden test does (``build_study`` of
tests/test_golden.py: superconvergence, small_batch, large_batch at ``precision=32-true``, then
``experiment=compare``) in a fresh process (so environment variables reach torch and MKL as they
load) with a fresh token cache, and takes the test's ``snapshot()``. Every number is compared with
its group's first variant, and that one with the stored snapshot tests/golden/smoke_study.json:
the relative difference |got - want| / |want| (values with |want| <= 1e-9, the test's absolute
floor, compared absolutely); the largest, the largest per section, and the values only one
snapshot has (a run that stopped at another step).

Kernels as the machine picks them (how the test ran before issue 19):

* ``baseline``: torch's default threads, oneDNN on, the native CPU capability;
* ``repeat``: the baseline again (0 when the machine is deterministic);
* ``no_mkldnn``: ``torch.backends.mkldnn.enabled = False``;
* ``threads1``: ``torch.set_num_threads(1)``;
* ``mkl_avx2`` / ``mkl_compatible``: ``MKL_CBWR=AVX2`` / ``COMPATIBLE`` (MKL's code path);
* ``aten_avx2`` / ``aten_default``: ``ATEN_CPU_CAPABILITY=avx2`` / ``default`` (PyTorch's
  kernels as on a CPU without AVX-512 / without explicit vectorisation).

Pinned (``PINNED_KERNELS`` of tests/test_golden.py, as the test runs now):

* ``pinned``, ``pinned_repeat``;
* ``pinned_threads2``: 2 threads instead of 1;
* ``pinned_no_mkldnn``: oneDNN off;
* ``pinned_onednn_avx2``: ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN as on a CPU without AVX-512).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
GOLDEN = TESTS / "golden" / "smoke_study.json"
sys.path.insert(0, str(TESTS))  # test_golden (and its conftest): the study exactly as the test

NATURAL: dict[str, dict[str, Any]] = {
    "baseline": {},
    "repeat": {},
    "no_mkldnn": {"mkldnn": False},
    "threads1": {"threads": 1},
    "mkl_avx2": {"env": {"MKL_CBWR": "AVX2"}},
    "mkl_compatible": {"env": {"MKL_CBWR": "COMPATIBLE"}},
    "aten_avx2": {"env": {"ATEN_CPU_CAPABILITY": "avx2"}},
    "aten_default": {"env": {"ATEN_CPU_CAPABILITY": "default"}},
}
PINNED: dict[str, dict[str, Any]] = {
    "pinned": {},
    "pinned_repeat": {},
    "pinned_threads2": {"env": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}},
    "pinned_no_mkldnn": {"mkldnn": False},
    "pinned_onednn_avx2": {"env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}},
}
VARIANTS = {**NATURAL, **PINNED}
FLOOR = 1e-9  # the test's absolute tolerance: values this small are compared absolutely


def variant_env(name: str) -> dict[str, str]:
    """The environment of one variant's process (read when torch and MKL load)."""
    from test_golden import PINNED_KERNELS

    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    if name in PINNED:
        env.update(PINNED_KERNELS)
    env.update(VARIANTS[name].get("env", {}))
    return env


def worker(name: str, out: Path) -> None:
    """Build the smoke study under one variant (in this fresh process) and write its snapshot."""
    import torch

    spec = VARIANTS[name]
    if "mkldnn" in spec:
        torch.backends.mkldnn.enabled = spec["mkldnn"]
    if "threads" in spec:
        torch.set_num_threads(spec["threads"])
    from test_golden import build_study, snapshot

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BATCHSIZE_STUDY_CACHE"] = str(Path(tmp) / "cache")
        sdir = Path(tmp) / "smoke_study"
        sdir.mkdir()
        build_study(sdir)
        snap = snapshot(sdir)
        info = json.loads((sdir / "kernels.json").read_text())
    info["mkldnn"] = torch.backends.mkldnn.enabled
    out.write_text(json.dumps({"info": info, "snapshot": snap}))


def floats(obj: Any, where: str = "") -> dict[str, float]:
    """Every number of a snapshot by its path (metrics.csv cells are numeric strings)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(floats(v, f"{where}.{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(floats(v, f"{where}[{i}]"))
    elif isinstance(obj, str):
        with contextlib.suppress(ValueError):
            out[where] = float(obj)
    elif isinstance(obj, float) or (isinstance(obj, int) and not isinstance(obj, bool)):
        out[where] = float(obj)
    return out


def section(path: str) -> str:
    """The part of the snapshot a value belongs to: records.<exp>, metrics.<exp> or comparison."""
    parts = path.lstrip(".").split(".")
    return parts[0] if parts[0] == "comparison" else f"{parts[0]}.{parts[1].split('[')[0]}"


def compare(got: dict[str, Any], want: dict[str, Any], top: int = 5) -> dict[str, Any]:
    """Max relative difference over the floats both snapshots have (overall and per section),
    with the largest ones, and the values only one snapshot has (runs of different lengths)."""
    g, w = floats(got), floats(want)
    rels: list[tuple[float, str]] = []
    for k in set(g) & set(w):
        a, b = g[k], w[k]
        if math.isnan(a) and math.isnan(b):
            continue
        if abs(b) <= FLOOR:
            rels.append((0.0 if abs(a - b) <= FLOOR else math.inf, k))
        else:
            rels.append((abs(a - b) / abs(b), k))
    rels.sort(reverse=True)
    by_section: dict[str, float] = {}
    for r, k in rels:
        by_section[section(k)] = max(by_section.get(section(k), 0.0), r)
    return {
        "n": len(rels),
        "max_rel": rels[0][0] if rels else 0.0,
        "n_over_1e-6": sum(r > 1e-6 for r, _ in rels),
        "top": rels[:top],
        "by_section": dict(sorted(by_section.items())),
        "only_in_one": sorted(set(g) ^ set(w)),
    }


def report(label: str, c: dict[str, Any]) -> None:
    """One comparison: the largest relative differences, by section, and values in one only."""
    print(
        f"{label}: max rel {c['max_rel']:.3e} over {c['n']} floats, {c['n_over_1e-6']} above 1e-6"
    )
    if c["max_rel"] > 0:
        for r, k in c["top"]:
            print(f"    {r:.3e}  {k}")
        print("    by section: " + ", ".join(f"{k} {v:.1e}" for k, v in c["by_section"].items()))
    if c["only_in_one"]:
        n = len(c["only_in_one"])
        print(
            f"    {n} values in one snapshot only (runs of other lengths), e.g. "
            f"{c['only_in_one'][:2]}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--save", type=Path, help="also keep each variant's snapshot in this folder")
    p.add_argument("--worker", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return
    names = args.variants.split(",")
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
        platform.processor(),
    )
    print(f"# golden_spread: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}")
    snaps: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", name, str(out)],
                env=variant_env(name),
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            data = json.loads(out.read_text())
            snaps[name] = data["snapshot"]
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                (args.save / f"{name}.json").write_text(json.dumps(data, indent=1))
            print(f"# built {name} in {time.perf_counter() - t0:.0f} s: {data['info']}", flush=True)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else None
    if golden is not None:
        golden.pop("_kernels", None)
    for group, title in ((NATURAL, "kernels as the machine picks them"), (PINNED, "pinned")):
        members = [n for n in names if n in group]
        if not members:
            continue
        ref = members[0]
        print(f"## {title}: against {ref}")
        worst = 0.0
        for n in members[1:]:
            c = compare(snaps[n], snaps[ref])
            worst = max(worst, c["max_rel"])
            report(f"{n} vs {ref}", c)
        if golden is not None:
            report(f"{ref} vs stored snapshot", compare(snaps[ref], golden))
        print(f"max relative spread over {len(members)} variants ({title}): {worst:.3e}")


if __name__ == "__main__":
    main()
