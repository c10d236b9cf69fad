"""lr_sweep: the grid, best LR and cliff on synthetic loss-vs-LR data, and a smoke sweep end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from batchsize_study.errors import ConfigError
from batchsize_study.lr_sensitivity import loss_at, relation, summarise, sweep_lrs, window_se

GRID = [2.0**k for k in range(-12, -4)]  # 0.00024 .. 0.016


def pts(losses, se=0.01, lrs=GRID, seed=0):
    return [{"lr": lr, "seed": seed, "final_loss": v, "train_se": se} for lr, v in zip(lrs, losses)]


def test_u_curve_best_and_cliff():
    s = summarise(pts([5.9, 5.5, 5.25, 5.2, 5.22, 5.6, 6.1, 6.5]))
    assert s["best_lr"] == GRID[3] and s["best_loss"] == 5.2
    # 5.22 is 0.02 above the best: within 2 * sqrt(2) * 0.01 = 0.028; 5.6 is not.
    assert s["cliff_lr"] == GRID[4] and s["cliff_upper_lr"] == GRID[5]
    assert [r["within_noise"] for r in s["per_lr"]] == [0, 0, 0, 1, 1, 0, 0, 0]
    assert not s["best_at_grid_edge"] and not s["cliff_at_grid_edge"]
    assert s["noise_method"].startswith("train_window")
    assert loss_at(s, GRID[5]) == 5.6 and loss_at(s, 0.5) is None
    json.dumps(s, allow_nan=False)  # JSON-ready


def test_noise_widens_the_flat_top_and_a_broken_lr_ends_it():
    losses = [5.9, 5.5, 5.25, 5.2, 5.22, 5.26, 5.24, 6.5]
    assert summarise(pts(losses, se=0.001))["cliff_lr"] == GRID[3]  # precise: only the best
    assert summarise(pts(losses, se=0.03))["cliff_lr"] == GRID[6]  # noisy: 5.26 is within
    broken = [5.9, 5.5, 5.25, 5.2, math.nan, 5.21, 5.2, 6.5]  # a NaN between two good LRs
    s = summarise(pts(broken, se=0.03))
    assert s["cliff_lr"] == GRID[3] and s["cliff_upper_lr"] == GRID[4]
    assert s["per_lr"][4]["diverged"] and s["per_lr"][4]["mean"] is None
    inf = summarise(pts([5.9, 5.5, 5.2, math.inf, None, 5.0, 7.0, 8.0]))
    assert inf["best_lr"] == GRID[5]  # the lowest finite loss, past broken points
    assert inf["cliff_lr"] == GRID[5]


def test_ties_go_to_the_lower_lr_and_edges_are_flagged():
    s = summarise(pts([5.2, 5.2, 5.3], lrs=GRID[:3], se=0.0))
    assert s["best_lr"] == GRID[0] and s["best_at_grid_edge"]
    assert s["cliff_lr"] == GRID[1]  # an exact tie is within noise even with se = 0
    top = summarise(pts([6.0, 5.5, 5.2], lrs=GRID[:3]))
    assert (
        top["cliff_lr"] == GRID[2] and top["cliff_at_grid_edge"] and top["cliff_upper_lr"] is None
    )


def test_diverged_status_and_all_diverged():
    p = pts([5.5, 5.2, 5.21], lrs=GRID[:3])
    p[2]["diverged"] = True  # status diverged although a loss was recorded
    s = summarise(p)
    assert s["cliff_lr"] == GRID[1] and s["per_lr"][2]["within_noise"] is False
    none = summarise(pts([math.nan, None], lrs=GRID[:2]))
    assert none["best_lr"] is None and none["cliff_lr"] is None
    assert summarise([])["best_lr"] is None


def test_seed_spread_replaces_the_window_noise():
    a = pts([5.5, 5.20, 5.30, 6.0], lrs=GRID[:4], seed=0, se=0.001)
    b = pts([5.7, 5.26, 5.24, 6.2], lrs=GRID[:4], seed=1, se=0.001)
    s = summarise(a + b)
    assert s["noise_method"].startswith("seeds")
    row = s["per_lr"][1]
    assert row["n"] == 2 and row["mean"] == pytest.approx(5.23)
    # pooled variance of (0.02, 0.0018, 0.0018, 0.02) = 0.0109; se = sqrt(0.0109 / 2)
    assert row["se"] == pytest.approx(math.sqrt(0.0109 / 2), rel=1e-3)
    assert s["best_lr"] == GRID[1] and s["cliff_lr"] == GRID[2]  # 5.27 is 0.04 above: within
    one_bad_seed = a + pts([5.7, 5.26, math.nan, 6.2], lrs=GRID[:4], seed=1)
    assert summarise(one_bad_seed)["per_lr"][2]["diverged"]


def test_grid_multiples_snap_and_absolute():
    g = sweep_lrs([1 / 64, 1 / 8, 1, 2], None, 0.006, snap=True)
    assert [lr for lr, _ in g] == [2.0**-13, 2.0**-10, 2.0**-7, 2.0**-6]
    assert g[0][1] == 1 / 64
    assert sweep_lrs([0.5, 0.55], None, 0.01, snap=True) == [(2.0**-8, 0.5)]  # deduplicated
    assert sweep_lrs([0.5, 1], None, 0.01, snap=False) == [(0.005, 0.5), (0.01, 1.0)]
    assert sweep_lrs([1], [0.003, 0.001], None, snap=False) == [(0.001, None), (0.003, None)]
    with pytest.raises(ValueError):
        sweep_lrs([1], None, None, snap=True)


def test_window_se_and_relation():
    assert window_se([9.0, 1.0, 3.0], 2) == pytest.approx(math.sqrt(2) / math.sqrt(2))
    assert window_se([1.0, math.nan], 2) is None and window_se([1.0], 5) is None
    assert relation(0.004, 0.001) == "4x above"
    assert relation(0.001, 0.004) == "4x below" and relation(0.001, 0.00101) == "at"


def test_sweep_settings_validate_where_defined():
    from batchsize_study.config import SweepConfig

    with pytest.raises(ConfigError, match="sweep.lrs"):
        SweepConfig(lrs=[0.001, -1.0])
    with pytest.raises(ConfigError, match="sweep.seeds"):
        SweepConfig(seeds=[0, 0])
    with pytest.raises(ConfigError, match="sweep.multiples"):
        SweepConfig(multiples=[])
    assert SweepConfig.grid_size(SweepConfig(multiples=[1, 2], seeds=[0, 1], point=3)) == 4
    with pytest.raises(ConfigError, match="sweep.point"):
        SweepConfig(multiples=[1, 2], seeds=[0, 1], point=4)  # 2 LRs x 2 seeds: indices 0..3
    with pytest.raises(ConfigError, match="sweep.point"):
        SweepConfig(lrs=[0.001], point=-1)


def test_point_indices_enumerate_seeds_x_lrs_and_collapse_onto_the_grid():
    from batchsize_study.config import SweepConfig
    from batchsize_study.sweep import grid_points

    s = SweepConfig(multiples=[1, 0.25, 0.26, 1], seeds=[3, 5])
    pts = grid_points(s, seed=0, x=0.01)
    assert [(p.index, p.seed) for p in pts] == [(i, 3 if i < 4 else 5) for i in range(8)]
    assert [p.same_as for p in pts] == [None, None, 1, 0, None, None, 5, 4]
    grid = sweep_lrs(list(s.multiples), None, 0.01, True)  # the serial sweep's grid, per seed
    for seed in (3, 5):
        kept = sorted((p.lr, p.multiple) for p in pts if p.seed == seed and p.same_as is None)
        assert kept == grid
    absolute = grid_points(SweepConfig(lrs=[0.003, 0.001]), seed=7, x=None)
    assert [(p.lr, p.multiple, p.seed) for p in absolute] == [
        (2.0**-8, None, 7),
        (2.0**-10, None, 7),
    ]


def test_smoke_lr_sweep_end_to_end_and_its_report(cfg_factory, tmp_path: Path):
    from batchsize_study.config import CompareConfig
    from batchsize_study.experiments import run
    from batchsize_study.lr_sensitivity import SUMMARY
    from batchsize_study.report import ReportContext, load_study
    from batchsize_study.report.sweeps import (
        sensitivity_section,
        superconvergence_section,
        tuned_section,
    )
    from batchsize_study.study import read_records

    study = tmp_path / "study"
    sc = run(cfg_factory("experiment=superconvergence"))
    assert sc["status"] == "diverged" and sc["onset_definition"]
    x = sc["unstable_lr"]
    short = ("max_steps=12", "warmup_steps=3", "val_every_steps=5")  # final val: an extra pass
    for exp in ("small_batch", "large_batch"):
        assert run(cfg_factory(f"experiment={exp}", *short))["status"] == "completed"
    grid = ("experiment=lr_sweep", "sweep.multiples=[0.25,1]", *short)
    small = run(cfg_factory(*grid))
    large = run(cfg_factory(*grid, "batch_size=64"))
    assert small["experiment"] == SUMMARY and small["unstable_lr"] == x
    assert len(small["points"]) == 2 and large["batch_size"] == 64
    assert {p["lr"] for p in small["points"]} == {
        lr for lr, _ in sweep_lrs([0.25, 1], None, x, True)
    }
    runs = read_records(study, "lr_sweep")
    assert len(runs) == 4 and all(r["steps_done"] == 12 or r["status"] == "diverged" for r in runs)
    assert all(r["final_val_loss"] is not None for r in runs if r["status"] == "completed")
    # Finished runs are reported, not redone; the summary recomputes from its points.
    again = run(cfg_factory(*grid))
    assert [p["run_id"] for p in again["points"]] == [p["run_id"] for p in small["points"]]
    assert summarise(small["points"], small["sigmas"])["cliff_lr"] == small["cliff_lr"]

    out = tmp_path / "report"
    out.mkdir()
    loaded, ctx = load_study(study), ReportContext(out, CompareConfig(dpi=60))
    sec = sensitivity_section(loaded, ctx)
    assert "best LR" in sec.markdown and set(sec.data["batches"]) == {"16", "64"}
    # the factor this model measures, offered as the setting that trains at the best
    k = sec.data["batches"]["16"]["best_lr"] / x
    assert sec.data["checks"]["lr_factor_measured"] == pytest.approx(k)
    assert f"lr_factor={k:.3g}`" in sec.markdown
    tuned = tuned_section(loaded, ctx)
    assert "own best LR" in tuned.markdown and tuned.data["seed_rule"] and tuned.data["tuned"]
    assert tuned.data["sentence"] in tuned.markdown
    # Per step, both comparisons carry the validation set's standard error (the plot's bars).
    for row in (tuned.data["seed_rule"]["64"], tuned.data["tuned"]["64"]):
        assert all(row["per_step"][f"{w}_se"] > 0 for w in ("small", "large")), row["per_step"]
    onsets = superconvergence_section(loaded, ctx)
    assert "onset" in onsets.markdown and onsets.data["onsets"]["rise"]["onset_lr"] is not None
    for p in sec.plots + tuned.plots + onsets.plots:
        assert (out / p).exists() and (out / p).stat().st_size > 1000


def test_sections_without_sweep_records_say_what_to_run(tmp_path: Path):
    from types import SimpleNamespace

    from batchsize_study.config import CompareConfig
    from batchsize_study.report import ReportContext
    from batchsize_study.report.sweeps import sensitivity_section, tuned_section
    from batchsize_study.study import select

    study, ctx = (
        SimpleNamespace(selection=select(tmp_path)),
        ReportContext(tmp_path, CompareConfig()),
    )
    sec = sensitivity_section(study, ctx)  # type: ignore[arg-type]
    assert "experiment=lr_sweep" in sec.markdown and sec.plots == [] and sec.data == {}
    sec = tuned_section(study, ctx)  # type: ignore[arg-type]
    assert "experiment=lr_sweep" in sec.markdown and sec.plots == []
