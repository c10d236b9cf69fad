"""experiment=evaluate: the saved models scored on the held-out test split.

Pure parts on synthetic records and losses; one smoke evaluation end to end on a copy of the
session's smoke study (so the shared study and its golden snapshot stay untouched)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cfg

from batchsize_study.config import EvaluateConfig
from batchsize_study.errors import ConfigError, UpstreamError
from batchsize_study.evaluate import (
    LOSSES_FILE,
    block_means,
    checkpoint_path,
    difference,
    load_test_windows,
    model_summary,
    prompts,
    select_pairs,
)
from batchsize_study.experiments import run
from batchsize_study.report.evaluation import evaluate_section
from batchsize_study.study import read_records

KEY = "k1"


def rec(exp: str, bs: int, seed: int, t: float, **kw) -> dict:
    r = {
        "experiment": exp,
        "status": "completed",
        "batch_size": bs,
        "seed": seed,
        "compat_key": KEY,
        "finished_at": t,
        "run_id": f"{exp}-bs{bs}-seed{seed}-{t:g}",
        "_path": f"/s/runs/{exp}-bs{bs}-seed{seed}-{t:g}/result.json",
    }
    if exp == "large_batch":
        r["derivation"] = {"small_batch_size": 16}
    r.update(kw)
    return r


# ---------------------------------------------------------------- pairing (pure)


def test_pairs_by_seed_and_names_what_is_left_out() -> None:
    records = [
        rec("superconvergence", 16, 0, 0.5, status="diverged"),
        rec("small_batch", 16, 0, 1),
        rec("small_batch", 16, 1, 2),
        rec("small_batch", 16, 0, 3),  # supersedes the first seed-0 run
        rec("large_batch", 64, 0, 4),
        rec("large_batch", 64, 2, 5),  # no small run with seed 2
        rec("large_batch", 64, 1, 6, compat_key="other"),  # another model: ignored
        rec("large_batch", 64, 1, 7, status="failed"),  # not completed: ignored
    ]
    pairs, notes = select_pairs(records, KEY, "/s")
    assert [(p.seed, p.small["finished_at"], p.large["finished_at"]) for p in pairs] == [(0, 3, 4)]
    text = " ".join(notes)
    assert "small_batch-bs16-seed0-1: superseded" in text
    assert "large_batch-bs64-seed2-5: no small_batch run (batch 16) with seed 2" in text
    assert "small_batch-bs16-seed1-2: no large_batch run with seed 1" in text


def test_every_large_batch_size_pairs_with_the_small_baseline() -> None:
    records = [
        rec("small_batch", 16, 0, 1),
        rec("small_batch", 16, 1, 2),
        rec("large_batch", 64, 0, 3),
        rec("large_batch", 64, 1, 4),
        rec("large_batch", 128, 0, 5),
    ]
    pairs, notes = select_pairs(records, KEY, "/s")
    assert [(p.large["batch_size"], p.seed) for p in pairs] == [(64, 0), (64, 1), (128, 0)]
    assert all(p.small["batch_size"] == 16 for p in pairs) and not notes


def test_nothing_to_evaluate_names_what_to_run() -> None:
    with pytest.raises(UpstreamError) as e:
        select_pairs([rec("superconvergence", 16, 0, 1, status="diverged")], KEY, "/s")
    msg = str(e.value)
    assert "\n" not in msg
    assert "no completed small_batch or large_batch record" in msg
    assert "experiment=superconvergence,small_batch,large_batch" in msg
    with pytest.raises(UpstreamError, match="no completed large_batch record"):
        select_pairs([rec("small_batch", 16, 0, 1)], KEY, "/s")


def test_records_of_another_model_are_named_as_such() -> None:
    records = [rec("small_batch", 16, 0, 1), rec("large_batch", 64, 0, 2)]
    with pytest.raises(UpstreamError, match="another model or corpus"):
        select_pairs(records, "different-key", "/s")


def test_no_common_seed_says_which_seed_to_run() -> None:
    records = [rec("small_batch", 16, 0, 1), rec("large_batch", 64, 3, 2)]
    with pytest.raises(UpstreamError, match=r"seeds \[0\].*seeds \[3\].*seed=0"):
        select_pairs(records, KEY, "/s")


def test_a_missing_checkpoint_is_named_with_the_fix(tmp_path: Path) -> None:
    r = rec("large_batch", 64, 0, 1, checkpoint=str(tmp_path / "gone.ckpt"))
    r["_path"] = str(tmp_path / "runs" / "x" / "result.json")
    with pytest.raises(UpstreamError) as e:
        checkpoint_path(r)
    assert "gone.ckpt" in str(e.value) and "experiment=large_batch seed=0 force=true" in str(
        e.value
    )
    moved = tmp_path / "runs" / "x" / "checkpoints" / "last.ckpt"  # a moved study folder
    moved.parent.mkdir(parents=True)
    moved.write_bytes(b"x")
    assert checkpoint_path(r) == moved


# ---------------------------------------------------------------- statistics (pure)


def test_block_means_drop_the_partial_block() -> None:
    assert block_means(np.arange(10.0), 4).tolist() == [1.5, 5.5]


def test_model_summary_flags_a_too_large_se() -> None:
    rng = np.random.default_rng(0)
    noisy = model_summary(rng.normal(5.0, 1.0, 400), 0.01)  # se ~ 0.05
    assert noisy["se_ok"] is False and noisy["test_loss_se"] == pytest.approx(0.05, rel=0.2)
    assert noisy["test_ppl"] == pytest.approx(np.exp(noisy["test_loss"]))
    assert model_summary(rng.normal(5.0, 0.1, 400), 0.01)["se_ok"] is True


def test_difference_pairs_windows_and_finds_a_shift_smaller_than_the_spread() -> None:
    """Windows vary by 1 nat in difficulty, the large model is 0.05 lower on each: unpaired the
    shift would drown in the spread; paired it is resolved."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(5.0, 1.0, 2000)
    small = difficulty + rng.normal(0, 0.05, 2000)
    large = difficulty - 0.05 + rng.normal(0, 0.05, 2000)
    s = EvaluateConfig(bootstrap_resamples=2000, block_windows=8)
    d = difference([small], [large], [0], s)
    assert d["mean_difference"] == pytest.approx(-0.05, abs=0.005)
    assert d["large_lower"] and not d["large_higher"]
    lo, hi = d["interval"]
    assert lo < -0.05 < hi < 0
    assert d["per_seed"][0]["windows"]["n"] == 2000
    assert d["pooled"]["blocks"]["n"] == 250
    assert d["across_seeds"] is None  # one seed: no test across seeds
    again = difference([small], [large], [0], s)
    assert again["interval"] == d["interval"]  # seeded: the same interval every time


def test_difference_without_a_shift_is_undecided_and_seeds_pool() -> None:
    rng = np.random.default_rng(2)
    difficulty = rng.normal(5.0, 1.0, 500)
    smalls = [difficulty + rng.normal(0, 0.05, 500) for _ in range(2)]
    larges = [difficulty + rng.normal(0, 0.05, 500) for _ in range(2)]
    d = difference(smalls, larges, [0, 1], EvaluateConfig(bootstrap_resamples=1000))
    assert not d["large_lower"] and not d["large_higher"]
    assert d["interval"][0] < 0 < d["interval"][1]
    assert len(d["per_seed"]) == 2 and d["across_seeds"]["n_seeds"] == 2
    pooled = np.mean(larges, axis=0) - np.mean(smalls, axis=0)
    assert d["mean_difference"] == pytest.approx(pooled.mean())


def test_windows_and_prompts_come_from_the_token_file(tmp_path: Path) -> None:
    path = tmp_path / "test.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    w = load_test_windows(str(path), "uint16", 8, None)
    assert w.shape == (12, 9) and w[1].tolist() == list(range(8, 17))  # as TokenWindows cuts
    assert load_test_windows(str(path), "uint16", 8, 5).shape == (5, 9)
    ps = prompts(w, 3, 4)
    assert [p.tolist() for p in ps] == [[0, 1, 2, 3], [48, 49, 50, 51], [88, 89, 90, 91]]


@pytest.mark.parametrize(
    "key,value",
    [
        ("max_windows", 1),
        ("batch_size", 0),
        ("max_se", 0.0),
        ("confidence", 1.0),
        ("bootstrap_resamples", 10),
        ("block_windows", 0),
        ("samples", -1),
        ("sample_tokens", 0),
        ("temperature", -0.5),
    ],
)
def test_bad_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        EvaluateConfig(**{key: value})
    assert e.value.key == f"evaluate.{key}"


# ---------------------------------------------------------------- end to end (smoke)


@pytest.fixture
def study_copy(smoke_study: Path, tmp_path: Path) -> Path:
    """The session's smoke study copied, its records pointing at the copy's files."""
    dst = tmp_path / "study"
    shutil.copytree(smoke_study, dst, ignore=shutil.ignore_patterns("report", "hydra"))
    for p in (dst / "runs").glob("*/result.json"):
        p.write_text(p.read_text().replace(str(smoke_study), str(dst)))
    return dst


def _files(sdir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(sdir)): p.read_bytes() for p in sorted(sdir.rglob("*")) if p.is_file()
    }


SMOKE_EVAL = ("experiment=evaluate", "precision=32-true", "evaluate.sample_tokens=8")


def test_smoke_evaluation_end_to_end(study_copy: Path, tmp_path: Path) -> None:
    before = _files(study_copy)
    r = run(make_cfg(study_copy, *SMOKE_EVAL))
    assert r["experiment"] == "evaluate" and r["status"] == "completed"
    run_dir = Path(r["_path"]).parent
    assert run_dir.name.startswith("evaluate-")
    after = _files(study_copy)
    added = sorted(set(after) - set(before))
    assert added == [f"runs/{run_dir.name}/{LOSSES_FILE}", f"runs/{run_dir.name}/result.json"]
    assert all(after[k] == v for k, v in before.items())  # wrote only its own run folder

    # one small and one large model, seed 0, scored on the same windows
    assert [m["experiment"] for m in r["models"]] == ["small_batch", "large_batch"]
    n = r["test_split"]["windows"]
    assert n >= 2 and r["test_split"]["tokens_scored"] == n * 32
    with np.load(run_dir / LOSSES_FILE) as z:
        losses = z["losses"]
        assert losses.shape == (2, n) and np.isfinite(losses).all()
        assert list(z["run_ids"]) == [m["run_id"] for m in r["models"]]
    for m, row in zip(r["models"], losses, strict=True):
        assert m["test_loss"] == pytest.approx(row.mean())
        assert m["test_ppl"] == pytest.approx(np.exp(row.mean()))
        assert len(m["samples"]) == 3 and all(s["continuation"] for s in m["samples"])
        assert all(s["prompt"] and len(s["prompt"]) < 400 for s in m["samples"])
    (cmp,) = r["comparisons"]
    assert cmp["mean_difference"] == pytest.approx((losses[1] - losses[0]).mean())
    assert cmp["interval"][0] <= cmp["mean_difference"] <= cmp["interval"][1]
    assert cmp["seeds"] == [0] and "seed 0" in cmp["text"]
    # the smoke test split is far too small for the 0.01-nat target: said loudly
    assert r["test_split_too_small"] == (r["max_test_loss_se"] >= 0.01)
    if r["test_split_too_small"]:
        assert r["message"].startswith("TEST SPLIT TOO SMALL")

    # deterministic for a fixed config: a forced re-run gives the same losses and samples
    again = run(make_cfg(study_copy, *SMOKE_EVAL, "force=true"))
    with np.load(run_dir / LOSSES_FILE) as z:
        assert np.array_equal(z["losses"], losses)
    assert [m["samples"] for m in again["models"]] == [m["samples"] for m in r["models"]]
    assert again["comparisons"][0]["interval"] == cmp["interval"]

    # the report section renders, figure included
    md, data, pngs = evaluate_section(read_records(study_copy), tmp_path / "report")
    assert "held-out test split" in md and f"{n:,} windows" in md
    assert "⟶" in md and data["run_id"] == r["run_id"]
    assert len(pngs) == 1 and Path(pngs[0]).stat().st_size > 1000
    if r["test_split_too_small"]:
        assert "**Warning: TEST SPLIT TOO SMALL" in md


def test_evaluate_refuses_a_missing_checkpoint_and_keeps_what_was_written(
    study_copy: Path,
) -> None:
    r = run(make_cfg(study_copy, "experiment=evaluate", "precision=32-true", "evaluate.samples=0"))
    kept = _files(study_copy)
    large = next(m for m in r["models"] if m["experiment"] == "large_batch")
    Path(large["checkpoint"]).unlink()
    del kept[str(Path(large["checkpoint"]).relative_to(study_copy))]
    cfg = make_cfg(
        study_copy, "experiment=evaluate", "precision=32-true", "evaluate.samples=0", "force=true"
    )
    with pytest.raises(UpstreamError) as e:
        run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "last.ckpt" in msg and "saved model is missing" in msg
    assert "experiment=large_batch seed=0 force=true" in msg
    assert _files(study_copy) == kept  # the earlier evaluation and every record untouched


def test_evaluate_on_an_empty_study_names_the_chain(tmp_path: Path) -> None:
    with pytest.raises(UpstreamError) as e:
        run(make_cfg(tmp_path / "empty", "experiment=evaluate"))
    assert "experiment=superconvergence,small_batch,large_batch" in str(e.value)
    assert not (tmp_path / "empty" / "runs").exists()  # nothing written
