"""LR derivation (pure) and upstream record selection."""

import json

import pytest

from batchsize_study.config import Config
from batchsize_study.errors import ConfigError, UpstreamError
from batchsize_study.study import (
    check_step_budget,
    derive_lr,
    find_small_batch,
    find_unstable_lr,
    large_batch_lr,
    read_records,
    small_batch_lr,
    write_json_atomic,
)


def test_small_batch_lr_is_factor_times_x():
    assert small_batch_lr(0.02, 0.5) == pytest.approx(0.01)
    assert small_batch_lr(0.02, 0.25) == pytest.approx(0.005)


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.5, 0.01 * 2.0),
        (1.0, 0.01 * 4.0),
        (-0.5, 0.01 / 2.0),
    ],  # sqrt, linear, the seed's literal text
)
def test_large_batch_lr_three_alphas(alpha, expected):
    assert large_batch_lr(0.01, 16, 64, alpha) == pytest.approx(expected)


def _rec(study, name, **fields):
    base = {
        "experiment": "superconvergence",
        "status": "diverged",
        "compat_key": "k",
        "batch_size": 16,
        "seed": 0,
    }
    base.update(fields)
    write_json_atomic(study / "runs" / name / "result.json", base)


def test_same_seed_record_is_preferred(tmp_path):
    _rec(tmp_path, "a", seed=0, unstable_lr=0.01, finished_at=1)
    _rec(tmp_path, "b", seed=1, unstable_lr=0.03, finished_at=2)
    up = find_unstable_lr(str(tmp_path), seed=1, compat_key="k", batch_size=16)
    assert (
        up.value == 0.03 and "same seed" in up.selection and up.paths[0].endswith("b/result.json")
    )


def test_median_of_diverged_when_no_same_seed(tmp_path):
    _rec(tmp_path, "a", seed=0, unstable_lr=0.01)
    _rec(tmp_path, "b", seed=1, unstable_lr=0.05)
    _rec(tmp_path, "c", seed=2, unstable_lr=0.02)
    _rec(tmp_path, "d", seed=3, unstable_lr=9.0, status="no_divergence")  # never used
    _rec(tmp_path, "e", seed=4, unstable_lr=9.0, compat_key="other")  # another model/corpus
    up = find_unstable_lr(str(tmp_path), seed=7, compat_key="k", batch_size=16)
    assert up.value == 0.02 and "median of 3" in up.selection and len(up.paths) == 3


def test_missing_or_unusable_upstream_is_one_clear_line(tmp_path):
    with pytest.raises(UpstreamError) as e:
        find_unstable_lr(str(tmp_path), seed=0, compat_key="k", batch_size=16)
    assert "experiment=superconvergence" in str(e.value) and "lr=" in str(e.value)
    _rec(tmp_path, "a", status="no_divergence", unstable_lr=None)
    with pytest.raises(UpstreamError) as e:
        find_unstable_lr(str(tmp_path), seed=0, compat_key="k", batch_size=16)
    assert "no_divergence" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UpstreamError):
        find_small_batch(str(tmp_path), seed=0, compat_key="k")


def test_torn_record_is_skipped_not_trusted(tmp_path):
    _rec(tmp_path, "good", unstable_lr=0.01)
    (tmp_path / "runs" / "torn").mkdir(parents=True)
    (tmp_path / "runs" / "torn" / "result.json").write_text('{"experiment": "superconv')
    recs = read_records(tmp_path)
    assert [r["unstable_lr"] for r in recs] == [0.01]


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "x" / "result.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [f.name for f in p.parent.iterdir()] == ["result.json"]


def test_step_budget_mismatch_is_refused_unless_allowed():
    small = {"max_steps": 100, "warmup_steps": 10}
    check_step_budget(small, 100, 10, allow=False)
    with pytest.raises(ConfigError) as e:
        check_step_budget(small, 200, 10, allow=False)
    assert "max_steps=200" in str(e.value) and "allow_step_mismatch" in str(e.value)
    check_step_budget(small, 200, 10, allow=True)
    assert large_batch_lr(1.0, 1, 1, 0.5) == 1.0  # the same batch: z = y exactly


def test_derived_lrs_are_exact_and_use_one_median(tmp_path):
    """small_batch: y = lr_factor * x exactly; large_batch: z = y (B/B_small)^alpha exactly, and
    the x it reports is the same median the small run's selection uses (not the upper middle)."""
    _rec(tmp_path, "sc1", seed=1, unstable_lr=0.1)
    _rec(tmp_path, "sc2", seed=2, unstable_lr=0.3)
    small = derive_lr(Config(task="small_batch", seed=7, batch_size=16), str(tmp_path), "k")
    assert small.peak_lr == 0.5 * 0.2 and small.derivation["unstable_lr"] == 0.2
    assert "median of 2 records" in small.source
    for name, seed, x, y in (("sb1", 1, 0.1, 0.05), ("sb2", 2, 0.3, 0.15)):
        _rec(
            tmp_path,
            name,
            experiment="small_batch",
            status="completed",
            seed=seed,
            unstable_lr=x,
            lr=y,
            max_steps=300,
            warmup_steps=30,
        )
    large = derive_lr(Config(task="large_batch", seed=7, batch_size=64), str(tmp_path), "k")
    assert large.derivation["small_lr"] == 0.1  # median of y = 0.05, 0.15
    assert large.derivation["unstable_lr"] == 0.2  # median of x = 0.1, 0.3 (was 0.3)
    assert large.peak_lr == 0.1 * (64 / 16) ** 0.5


def test_x_from_median_rests_x_on_every_seed_newest_per_seed(tmp_path):
    _rec(tmp_path, "a", seed=0, unstable_lr=0.01, finished_at=1)
    _rec(tmp_path, "b", seed=1, unstable_lr=0.03, finished_at=2)
    _rec(tmp_path, "c", seed=2, unstable_lr=0.02, finished_at=3)
    _rec(tmp_path, "d", seed=1, unstable_lr=0.05, finished_at=4)  # seed 1 re-run: replaces b
    own = find_unstable_lr(str(tmp_path), seed=0, compat_key="k", batch_size=16)
    assert own.value == 0.01 and len(own.records) == 1
    up = find_unstable_lr(str(tmp_path), seed=0, compat_key="k", batch_size=16, rule="median")
    assert up.value == 0.02 and len(up.records) == 3 and "x_from=median" in up.selection
    assert not any(p.endswith("b/result.json") for p in up.paths)


def test_x_from_is_validated():
    from batchsize_study.config import Config, validate

    with pytest.raises(ConfigError, match="x_from"):
        validate(Config(task="small_batch", x_from="mean"))
