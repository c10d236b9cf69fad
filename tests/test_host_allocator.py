"""The host allocator setting (runtime.tune_host_allocator): on a CPU run under glibc, freed
tensors stay in the process instead of being unmapped and faulted in again on the next step."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest
from conftest import make_cfg

from batchsize_study.config import validate
from batchsize_study.errors import ConfigError
from batchsize_study.runtime import tune_host_allocator

GLIBC = platform.libc_ver()[0] == "glibc"

# Allocates, fills and frees a 64 MiB tensor (above glibc's largest mmap threshold, like a CPU
# step's logits) eight times; prints the minor page faults of the last four.
FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from batchsize_study.runtime import tune_host_allocator
    print("applied:", tune_host_allocator(sys.argv[1], "cpu"))
    for _ in range(4):  # the heap grows to its working size (two tensors, alignment)
        torch.empty(16 * 2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(16 * 2**20).fill_(1.0)
    print("faults:", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(setting: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, check=True
    ).stdout
    applied = out.split("applied: ", 1)[1].splitlines()[0]
    return applied, int(out.split("faults: ", 1)[1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_auto_stops_refaulting_large_tensors_on_the_cpu():
    applied, tuned = _faults("auto")
    assert applied == "glibc: mmap and trim off"
    plain, untuned = _faults("system")
    assert plain == "system"
    pages = 4 * 64 * 2**20 // 4096  # what four fresh 64 MiB tensors fault in
    assert untuned > pages // 2, untuned  # the default really refaults each time
    assert tuned < pages // 20, (tuned, untuned)


def test_gpu_runs_and_system_are_left_alone(monkeypatch):
    assert tune_host_allocator("system", "cpu") == "system"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert tune_host_allocator("auto", "gpu") == "system"


def test_a_wrong_setting_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(tmp_path, "host_allocator=jemalloc"))
    msg = str(e.value)
    assert "host_allocator" in msg and "jemalloc" in msg and "auto or system" in msg
    assert "\n" not in msg
