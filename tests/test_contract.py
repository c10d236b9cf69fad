"""The per-step contract (steps.py) and the package's import graph."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from batchsize_study.noise import NoiseScaleCallback
from batchsize_study.recorder import StepRecorder
from batchsize_study.spike import DestabilisationCallback, DestabilisationDetector
from batchsize_study.steps import StepConsumer, StepStats

PACKAGE = Path(__file__).resolve().parents[1] / "batchsize_study"


class _NoCollectives:
    """A strategy whose other ranks are gone: any collective would hang, so it raises."""

    def reduce(self, *a, **k):
        raise AssertionError("a collective on the exception path")

    def reduce_boolean_decision(self, *a, **k):
        raise AssertionError("a collective on the exception path")


def test_exception_flush_starts_no_collective(tmp_path):
    """Under DDP an exception on one rank flushes its pending rows without collectives, and the
    consumers it feeds (detector, noise scale) must not start one either."""
    detector = DestabilisationCallback(DestabilisationDetector(), stop_on_rise=False)
    noise = NoiseScaleCallback(2, 8)
    noise._steps, noise._small, noise._big = 1, torch.tensor(1.0), torch.tensor(0.5)
    noise._sum_small, noise._sum_big = torch.tensor(1.0), torch.tensor(0.5)
    recorder = StepRecorder(str(tmp_path / "metrics.csv"), 128, consumers=[noise, detector])
    trainer = SimpleNamespace(
        world_size=2,
        strategy=_NoCollectives(),
        is_global_zero=False,
        loggers=[],
        callbacks=[recorder, noise, detector],
        should_stop=False,
    )
    module = SimpleNamespace(step_stats=StepStats(), device=torch.device("cpu"))
    recorder._pending = [(1, 0.01, torch.tensor(float("nan")), None)]
    recorder.on_exception(trainer, module, RuntimeError("rank 1 failed"))
    assert detector.failure is not None and "non-finite" in detector.failure
    assert trainer.should_stop


def test_consumers_follow_the_declared_protocol():
    assert isinstance(DestabilisationCallback(DestabilisationDetector(), True), StepConsumer)
    assert isinstance(NoiseScaleCallback(2, 8), StepConsumer)


def _imports(path: Path, package: str, modules: set[str]) -> set[str]:
    """Every batchsize_study module imported anywhere in the file, lazy imports included.
    ``from pkg import sub`` depends on the submodule ``pkg.sub`` when there is one, else on pkg."""
    tree = ast.parse(path.read_text())
    out = set()
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = list(here[: len(here) - node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        out.update(n for n in names if n == package or n.startswith(package + "."))
    return out


def _module_graph() -> dict[str, set[str]]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    graph = {}
    for name, p in mods.items():
        deps = {d for d in _imports(p, "batchsize_study", set(mods)) if d in mods and d != name}
        # `from batchsize_study import x` names a submodule when x is one
        graph[name] = {d for d in deps if d != "batchsize_study" or name == "batchsize_study"}
    return graph


def test_the_package_has_no_import_cycle():
    """Arrows point one way (DESIGN.md): no cycle in the import graph, lazy imports included."""
    graph = _module_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "batchsize_study.training" in graph  # the walk saw the package
