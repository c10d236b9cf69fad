"""One study, one answer (issue 19): every consumer reads the same runs from the one selection,
and the report reads only the study folder it is given."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, make_cfg, make_record

from batchsize_study.study import ENVELOPE, STAGES, read_records, select_records, write_record

KEY = "k"


def rec(exp: str, bs: int, seed: int, t: float, **kw: Any) -> dict[str, Any]:
    return make_record(exp, bs, seed, t, KEY, **kw)


# ---------------------------------------------------------------- the rules (pure)


def test_the_ladder_keeps_one_run_per_seed_and_a_rerun_supersedes() -> None:
    """Before: select_rungs averaged a superseded run and a run with another alpha at the same
    batch into one rung and counted them as extra seeds."""
    records = [
        rec("small_batch", 16, 0, 1),
        rec("large_batch", 64, 0, 2, lr=0.02),
        rec("large_batch", 64, 0, 3, lr=0.04, derivation={"small_batch_size": 16}),  # alpha=1
    ]
    sel = select_records(records, "/s")
    assert {b: sorted(g) for b, g in sel.rungs.items()} == {16: [0], 64: [0]}
    assert sel.rungs[64][0]["finished_at"] == 3 and sel.large[64][0]["finished_at"] == 3
    assert any("large_batch-bs64-seed0-2: superseded" in n for n in sel.ignored)
    assert sel.marks()["z_large_lr"] == {64: 0.04}


def test_x_is_the_one_each_compared_small_run_used() -> None:
    """Before: compare's marks averaged every superconvergence record of the study."""
    records = [
        rec("superconvergence", 16, 0, 1, status="diverged", unstable_lr=0.02),
        rec("superconvergence", 16, 0, 2, status="diverged", unstable_lr=0.08),  # not used
        rec(
            "small_batch",
            16,
            0,
            3,
            unstable_lr=0.02,
            derivation={"upstream": ["/elsewhere/runs/superconvergence-bs16-seed0-1/result.json"]},
        ),
        rec("large_batch", 64, 0, 4),
    ]
    sel = select_records(records, "/s")
    assert sel.marks()["x_unstable_lr"] == 0.02
    assert [r["finished_at"] for r in sel.superconvergence] == [1]


def test_sweep_points_are_selected_per_lr_and_seed_wherever_they_ran() -> None:
    sweep = [
        rec("lr_sweep", 16, 0, 0.5, lr=0.02, compat_key="other"),  # another configuration
        rec("lr_sweep", 16, 0, 1, lr=0.01),
        rec("lr_sweep", 16, 0, 2, lr=0.02),
        rec("lr_sweep", 16, 0, 3, lr=0.01),  # a re-run of the same point
        rec("lr_sweep", 16, 1, 4, lr=0.01),
    ]
    sel = select_records(sweep, "/s")
    got = [(p["lr"], p["seed"], p["finished_at"]) for p in sel.sweeps[16]]
    assert got == [(0.01, 0, 3), (0.01, 1, 4), (0.02, 0, 2)]


def test_an_evaluation_of_other_runs_says_which() -> None:
    small, large = rec("small_batch", 16, 0, 1), rec("large_batch", 64, 0, 2)
    ev = rec("evaluate", 0, 0, 3, models=[{"run_id": small["run_id"]}, {"run_id": large["run_id"]}])
    sel = select_records([small, large, ev], "/s")
    assert sel.evaluation is ev and sel.evaluation_note is None
    newer = rec("large_batch", 64, 0, 4)
    sel = select_records([small, large, ev, newer], "/s")
    assert sel.evaluation is ev and newer["run_id"] in (sel.evaluation_note or "")


def test_every_record_kind_is_written_in_the_one_envelope(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config_hash"):
        write_record(tmp_path / "r.json", {"experiment": "x", "status": "completed"})
    body = {k: 1 for k in ENVELOPE} | {"experiment": "lr_sweep_summary"}
    out = write_record(tmp_path / "runs" / "a" / "result.json", body)
    assert out["package_version"] and out["_path"].endswith("result.json")
    assert read_records(tmp_path)[0]["experiment"] == "lr_sweep_summary"


def test_the_stage_table_covers_every_task_and_no_code_tests_names() -> None:
    """Adding an experiment touches the table and its own module, not string tests elsewhere."""
    from batchsize_study.config import TASKS

    assert set(STAGES) == set(TASKS)
    names = {*STAGES, "lr_sweep_summary", "stability_probe_summary"}
    allowed = {"config.py", "stages.py", "__main__.py"}
    offenders = []
    for path in sorted((REPO / "batchsize_study").rglob("*.py")):
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    if isinstance(side, ast.Constant) and side.value in names:
                        offenders.append(f"{path.name}:{node.lineno}")
                    if isinstance(side, ast.Tuple) and any(
                        isinstance(e, ast.Constant) and e.value in names for e in side.elts
                    ):
                        offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders  # noqa: PT017


# ---------------------------------------------------------------- a study moved, copied, re-run


def _comparison(sdir: Path) -> dict[str, Any]:
    from batchsize_study.experiments import run

    run(make_cfg(sdir, "experiment=compare", "compare.dpi=40"))
    text = (sdir / "report" / "comparison.json").read_text().replace(str(sdir), "<study>")
    out = json.loads(text)
    out.pop("study_dir", None)
    return out


@pytest.fixture(scope="module")
def swept_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke study with superconvergence, small and large batch, an LR sweep at both batch
    sizes and a test-set evaluation."""
    from batchsize_study.experiments import run

    sdir = tmp_path_factory.mktemp("swept") / "study"
    short = ("max_steps=12", "warmup_steps=3", "val_every_steps=6", "precision=32-true")
    assert run(make_cfg(sdir, "experiment=superconvergence", "precision=32-true"))["status"]
    for exp in ("small_batch", "large_batch"):
        assert run(make_cfg(sdir, f"experiment={exp}", *short))["status"] == "completed"
    for b in (16, 64):
        run(
            make_cfg(
                sdir, "experiment=lr_sweep", "sweep.multiples=[0.25,1]", f"batch_size={b}", *short
            )
        )
    ev = run(make_cfg(sdir, "experiment=evaluate", "precision=32-true", "evaluate.samples=0"))
    assert ev["status"] == "completed"
    return sdir


def test_compare_reads_only_the_study_it_is_given(swept_study: Path, tmp_path: Path) -> None:
    """A copy reports the same after the original's curves are emptied; a moved study (the
    original gone) runs and reports the same."""
    original = tmp_path / "original"
    shutil.copytree(swept_study, original)
    want = _comparison(original)
    assert want["lr_sensitivity"]["batches"] and want["tuned"]["tuned"]
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    for csv in original.glob("runs/*/metrics.csv"):
        csv.write_text("")
    for npz in original.glob("runs/*/*.npz"):
        npz.unlink()
    assert _comparison(copy) == want
    moved = tmp_path / "moved"
    shutil.copytree(copy, moved)
    shutil.rmtree(copy)
    assert _comparison(moved) == want


def test_a_rerun_with_another_alpha_is_compared_and_the_test_set_section_says_so(
    swept_study: Path, tmp_path: Path
) -> None:
    from batchsize_study.experiments import run

    sdir = tmp_path / "study"
    shutil.copytree(swept_study, sdir)
    short = ("max_steps=12", "warmup_steps=3", "val_every_steps=6", "precision=32-true")
    newer = run(make_cfg(sdir, "experiment=large_batch", "lr_scaling.alpha=1.0", *short))
    comp = _comparison(sdir)
    compared = {
        r
        for c in comp["verdict"]["comparisons"]
        for r in c.get("small_runs", []) + c.get("large_runs", [])
    } or {row["run_id"] for row in comp["runs"] if row["experiment"] != "superconvergence"}
    assert newer["run_id"] in compared
    ev = comp["evaluation"]
    named = {m["run_id"] for m in ev["models"]}
    assert named <= compared or (ev["note"] and "other runs" in ev["note"])
    assert not ev["of_compared_runs"] and newer["run_id"] in ev["note"]
    report = (sdir / "report" / "report.md").read_text()
    assert "scored other runs than the verdict compares" in report


def test_a_run_much_longer_than_x_s_horizon_is_warned() -> None:
    from batchsize_study.report.sections import horizon_warning

    sc = rec("superconvergence", 16, 0, 1, status="diverged", spike_step=220, unstable_lr=0.004)
    for steps, warned in ((300, False), (1200, True)):
        small = rec("small_batch", 16, 0, 2, max_steps=steps, unstable_lr=0.004)
        marks = select_records([sc, small, rec("large_batch", 64, 0, 3)], "/s").marks()
        assert marks["x_read_at_step"] == 220 and marks["planned_steps"] == steps
        text = horizon_warning(marks)
        assert bool(text) is warned and (not warned or "max_steps=1200" in text)
