"""The recorder's logger thread hands rows to the loggers in batches (not one wake per step),
in order, each with its own step, and everything queued on drain."""

from __future__ import annotations

import threading
import time

from batchsize_study.recorder import _LoggerThread


class _Capture:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.calls.append((step, threading.current_thread().name))


def _wait_for(lg: _Capture, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(lg.calls) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_rows_wait_for_the_interval_then_arrive_together_in_order():
    lg, t = _Capture(), _LoggerThread(interval=1.0)
    t.put([lg], {"x": 0.0}, 0)  # starts the thread, which takes step 0 at once
    _wait_for(lg, 1)
    assert [s for s, _ in lg.calls] == [0]
    for step in range(1, 11):  # the thread now sleeps for up to a second
        t.put([lg], {"x": float(step)}, step)
    time.sleep(0.1)
    assert [s for s, _ in lg.calls] == [0]  # not woken per row: they wait for the interval
    _wait_for(lg, 11)
    assert [s for s, _ in lg.calls] == list(range(11))
    assert {name for _, name in lg.calls} == {"metrics-logger"}


def test_drain_delivers_everything_queued_at_once():
    lg, t = _Capture(), _LoggerThread(interval=60.0)
    for step in range(5):
        t.put([lg], {"x": float(step)}, step)
    t0 = time.perf_counter()
    t.drain()
    assert time.perf_counter() - t0 < 5.0  # not the 60 s interval
    assert [s for s, _ in lg.calls] == list(range(5))
