"""benchmarks/throughput.py's paired design on a smoke-sized model: both sides run in their
segments, each prints its figures, the last line is ``ratio R``, and no worker (nor wandb's
service) is left running or stopped. The speed figures themselves are not asserted: performance
claims live in benchmarks/README.md, never in a timed test."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch
from cli_utils import REPO


def _workers() -> list[str]:
    """Command lines of benchmark workers still alive on this machine."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "throughput.py --worker" in cmd:
            found.append(cmd)
    return found


def test_paired_throughput_runs_both_sides_in_segments():
    cmd = [
        sys.executable,
        "benchmarks/throughput.py",
        "--rounds",
        "1",
        "--steps",
        "8",
        "--segment",
        "3",
        "--experiments",
        "small_batch",
        "--bare-noise",  # the bare side's noise arithmetic (split steps, norm hooks) runs too
        "debug=smoke",
        "precision=32-true",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio \d+\.\d{3}", lines[-1]), lines[-1]
    assert "bare loop: does the noise scale's arithmetic too (--bare-noise)" in lines
    # 7 timed steps in segments of 3: 3 + 3 + 1, on each side, each with its resource use
    for side in ("package", "bare"):
        row = next(ln for ln in lines if re.match(rf"round 1 small_batch\s+{side}\s", ln))
        assert "(7 steps in" in row and "3 segments" in row and "page faults" in row, row
    ratio = next(ln for ln in lines if "small_batch ratio" in ln)
    assert len(re.findall(r"\d\.\d{3}", ratio.split("per segment")[1])) == 3, ratio
    assert not _workers()


def test_noise_overhead_reads_measured_steps_from_a_run(tmp_path):
    """``noise_overhead.py --metrics``: metrics.csv's step s is global step s - 1, so with
    split_every=4 the measured rows are steps 1, 5, 9, ...; here they run at half the speed."""
    from batchsize_study.metrics import CSV_FIELDS

    rows = [",".join(CSV_FIELDS)]
    for s in range(1, 101):
        row = dict.fromkeys(CSV_FIELDS, "")
        row.update(step=s, train_loss=3.0, tokens_per_second=500 if (s - 1) % 4 == 0 else 1000)
        rows.append(",".join(str(row[k]) for k in CSV_FIELDS))
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    res = subprocess.run(
        [sys.executable, "benchmarks/noise_overhead.py", "--metrics", str(csv_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "measured steps 500 tokens/s (n=20), others 1,000 (n=60)" in res.stdout, res.stdout
    assert "+100.0% longer; over the run +25.0% time" in res.stdout


def test_gpu_script_skips_what_its_budget_cannot_hold(tmp_path):
    """gpu.sh on a budget too small for any part: every part is skipped, listed, and it exits 0
    (a device call must always return what it has)."""
    res = subprocess.run(
        ["bash", "benchmarks/gpu.sh"],
        cwd=REPO,
        env={**os.environ, "TINY": "1", "BUDGET": "30", "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    skipped = (tmp_path / "skipped.txt").read_text().splitlines()
    parts = ("corpus", "eager throughput", "smoke study", "compiled throughput")
    assert [line.split(" skipped")[0] for line in skipped] == [f"--- {p}" for p in parts]
    for f in tmp_path.glob("throughput_*.txt"):  # each says why it holds no figure
        assert f.read_text().startswith("--- ") and "skipped" in f.read_text()


def test_bare_loop_with_noise_does_the_measurements_arithmetic(monkeypatch, tmp_path):
    """``bare_stepper(noise=True)`` (throughput.py --bare-noise) runs small_batch's split steps
    (global steps 0 and 4 of 8: one extra forward each) and a squared-norm hook per parameter
    and piece on those steps only; ``noise=False`` does neither."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _common

    from batchsize_study.model import build_model

    forwards, hook_norms = [], []
    ce, vn = _common.F.cross_entropy, torch.linalg.vector_norm

    def counted_ce(*a, **k):  # noqa: ANN002, ANN003, ANN202
        forwards.append(1)
        return ce(*a, **k)

    def counted_vn(*a, **k):  # noqa: ANN002, ANN003, ANN202
        if k.get("dtype") is torch.float32:  # the hook's call (clipping passes no dtype)
            hook_norms.append(1)
        return vn(*a, **k)

    monkeypatch.setattr(_common.F, "cross_entropy", counted_ce)
    monkeypatch.setattr(torch.linalg, "vector_norm", counted_vn)
    c = _common.compose(
        "debug=smoke", "experiment=small_batch", "lr=0.003", "max_steps=8",
        "precision=32-true", f"study.dir={tmp_path}",
    )  # fmt: skip
    assert c.micro_batch_size == c.batch_size and c.noise.split_every == 4
    params = len({id(p) for p in build_model(c.model, 512).parameters()})
    list(_common.bare_stepper(c, noise=False))
    assert len(forwards) == 8 and not hook_norms
    forwards.clear()
    list(_common.bare_stepper(c, noise=True))
    measured = 2  # global steps 0 and 4
    assert len(forwards) == 8 + measured * (c.noise.split - 1)
    assert len(hook_norms) == measured * c.noise.split * params


def test_bare_loop_resolves_auto_as_the_package_does(tmp_path, monkeypatch):
    """A preset's ``micro_batch_size=auto`` reaches the bare loop as the number the package's own
    resolution gives (here a simulated device that fits 6 of 16 sequences: 4, accumulation 4),
    so the two sides of throughput.py train the same split."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _common

    from batchsize_study import microbatch

    c = _common.compose(
        "debug=smoke", "experiment=small_batch", "micro_batch_size=auto", f"study.dir={tmp_path}"
    )
    assert _common.resolved_micro_batch(c).micro_batch_size == 16  # a CPU: the whole batch

    def limited(cfg, vocab_size, precision):  # noqa: ANN001, ANN202
        def trial(micro: int) -> None:
            if micro > 6:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        return trial

    monkeypatch.setattr(microbatch, "device_trial", limited)
    assert _common.resolved_micro_batch(c).micro_batch_size == 4
    numeric = _common.compose("debug=smoke", "micro_batch_size=8", f"study.dir={tmp_path}")
    assert _common.resolved_micro_batch(numeric) is numeric
