"""notebooks/compare.ipynb runs top to bottom against the smoke study and shows the tables and
plots; it is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "compare.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_on_the_smoke_study(
    smoke_study: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbclient import NotebookClient

    # The kernel inherits this environment: the study to open, and this checkout's package.
    monkeypatch.setenv("BATCHSIZE_STUDY_DIR", str(smoke_study))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("MPLBACKEND", "agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # loss/step, loss/tokens, difference, LR schedules, superconvergence
    text = "\n".join(
        o.get("data", {}).get("text/markdown", "") + o.get("text", "") for o in outputs
    )
    assert str(smoke_study) in text
    assert "rests on one seed" in text and "Per token seen" in text
    assert "| small_batch | 0 | completed | 16 |" in text
