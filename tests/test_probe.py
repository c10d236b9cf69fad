"""stability_probe: the 'stops improving' decision, its settings, and a smoke run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from batchsize_study.config import CompareConfig, ProbeConfig
from batchsize_study.errors import ConfigError
from batchsize_study.experiments import run
from batchsize_study.probe_analysis import (
    SUMMARY,
    analyse,
    final_loss,
    final_loss_se,
    optimum_at_lowest_multiple,
    still_improving,
)
from batchsize_study.report.sections import ReportContext, probe_section
from batchsize_study.study import read_records, select


def _p(m: float, loss: float, se: float = 0.0, destabilised: bool = False) -> dict:
    return {"multiple": m, "final_loss": loss, "final_loss_se": se, "destabilised": destabilised}


def test_boundary_is_where_a_higher_lr_stops_helping_for_good():
    r = analyse(0.01, [_p(0.25, 5.0), _p(0.5, 4.5), _p(1, 4.2), _p(2, 4.4), _p(4, math.inf)])
    assert r["last_good_multiple"] == 1 and r["first_bad_multiple"] == 2
    assert r["boundary_lr"] == pytest.approx(0.01 * math.sqrt(2))
    assert r["agrees_within_2x"]
    assert [p["stops_improving"] for p in r["probes"]] == [False, False, False, True, True]
    assert r["short_horizon_best_multiple"] == 1
    # One worse multiple followed by a better one does not end the range.
    r = analyse(0.01, [_p(0.25, 5.0), _p(0.5, 4.5), _p(1, 4.6), _p(2, 4.4), _p(4, 4.7)])
    assert r["first_bad_local"] == 1 and r["first_bad_multiple"] == 4
    assert r["boundary_lr"] == pytest.approx(0.01 * math.sqrt(8))
    assert not r["agrees_within_2x"]  # x is 2.8x below where training stops improving


def test_noise_tolerance_and_out_of_range():
    noisy = analyse(0.01, [_p(1, 4.0, se=0.1), _p(2, 4.1, se=0.1)])
    assert noisy["first_bad_multiple"] is None  # 0.1 apart, within 2 combined standard errors
    assert noisy["boundary"] == "above the probed range" and noisy["agrees_within_2x"] is False
    exact = analyse(0.01, [_p(1, 4.0), _p(2, 4.1)])
    assert exact["first_bad_multiple"] == 2 and exact["agrees_within_2x"]
    short = analyse(0.01, [_p(0.5, 5.0), _p(1, 4.5)])
    assert short["agrees_within_2x"] is None  # still improving at 1x: undetermined
    below = analyse(0.01, [_p(0.5, 5.0, destabilised=True), _p(1, 6.0)])
    assert below["boundary"] == "below the probed range" and not below["agrees_within_2x"]


def test_still_improving_reads_the_end_of_the_run():
    falling = [6.0 - 0.01 * i for i in range(100)]
    assert still_improving(falling, 20)
    flat_then_up = [6.0 - 0.02 * i for i in range(50)] + [5.0 + 0.01 * i for i in range(50)]
    assert not still_improving(flat_then_up, 20)
    assert not still_improving(falling[:-1] + [math.nan], 20)


def test_final_loss_and_settings():
    assert final_loss([3.0, 2.0, 1.0], 2) == pytest.approx(1.5)
    assert final_loss([3.0, math.nan, 1.0], 2) == math.inf
    assert final_loss_se([1.0, 3.0], 2) == pytest.approx(1.0)  # std sqrt(2) / sqrt(2)
    with pytest.raises(ConfigError, match=r"probe.multiples=\[1.0\]"):
        ProbeConfig(multiples=[1.0])
    with pytest.raises(ConfigError, match="probe.warmup=5: use 0..probe.steps-1 \\(4\\)"):
        ProbeConfig(steps=5, warmup=5)


def test_an_optimum_at_the_lowest_multiple_is_flagged():
    probes = [{"multiple": m} for m in (0.125, 0.25, 0.5)]
    assert optimum_at_lowest_multiple({"short_horizon_best_multiple": 0.125, "probes": probes})
    assert not optimum_at_lowest_multiple({"short_horizon_best_multiple": 0.25, "probes": probes})
    assert not optimum_at_lowest_multiple({"short_horizon_best_multiple": None, "probes": probes})


def test_smoke_stability_probe_end_to_end(cfg_factory, tmp_path: Path):
    study = tmp_path / "study"
    sc = run(cfg_factory("experiment=superconvergence"))
    assert sc["status"] == "diverged"
    summary = run(
        cfg_factory(
            "experiment=stability_probe",
            "probe.steps=12",
            "probe.warmup=3",
            "probe.multiples=[0.5,1,2]",
            "probe.final_window=4",
            "probe.lr_find_num_training=15",
            # a preset's auto micro batch: the runs and lr_find take the resolved number
            "micro_batch_size=auto",
        )
    )
    assert summary["experiment"] == SUMMARY and summary["unstable_lr"] == sc["unstable_lr"]
    runs = read_records(study, "stability_probe")
    assert sorted(r["probe_multiple"] for r in runs) == [0.5, 1, 2]
    for r in runs:
        assert r["lr"] == pytest.approx(r["probe_multiple"] * sc["unstable_lr"])
        assert r["steps_done"] == 12 or r["status"] == "diverged"
        assert r["derivation"]["micro_batch_size_setting"] == "auto"
    assert summary["lr_find"] is not None and len(summary["lr_find"]["lrs"]) == 15
    on_disk = json.loads(Path(summary["_path"]).read_text())
    assert on_disk["first_bad_multiple"] == summary["first_bad_multiple"]
    out = tmp_path / "report"
    out.mkdir()
    sec = probe_section(select(study), ReportContext(out, CompareConfig()))
    assert sec.title == "Is x real? (stability probe)" and "lr_find" in sec.markdown
    assert "`experiment=small_batch y_from=probe` trains y" in sec.markdown
    assert sec.data["unstable_lr"] == sc["unstable_lr"]
    assert sec.plots == ["stability_probe.png"] and (out / "stability_probe.png").exists()

    # y_from=probe: the small batch trains at the probe's short-horizon optimum. The optimum is
    # set here (one mid-grid, one at the grid's lowest multiple) so both branches are exercised.
    x, path = sc["unstable_lr"], Path(summary["_path"])
    rec = json.loads(path.read_text())
    rec.update(short_horizon_best_multiple=1.0, short_horizon_best_lr=x)
    path.write_text(json.dumps(rec))
    short = ("experiment=small_batch", "y_from=probe", "max_steps=6", "warmup_steps=2")
    small = run(cfg_factory(*short))
    assert small["status"] == "completed" and small["lr"] == pytest.approx(x)
    d = small["derivation"]
    assert d["y_from"] == "probe" and d["lr_factor"] == pytest.approx(1.0)
    assert d["upstream"] == [str(path)] and "short-horizon optimum" in small["lr_source"]
    rec.update(short_horizon_best_multiple=0.5, short_horizon_best_lr=0.5 * x)
    path.write_text(json.dumps(rec))
    from batchsize_study.errors import UserError

    with pytest.raises(
        UserError, match=r"lowest multiple \(0.5x\).*probe.multiples=\[0.125,0.25,0.5"
    ):
        run(cfg_factory(*short, "seed=1"))


def test_probe_without_superconvergence_says_what_to_run(cfg_factory):
    from batchsize_study.errors import UserError

    with pytest.raises(UserError, match="superconvergence"):
        run(cfg_factory("experiment=stability_probe"))
    with pytest.raises(UserError, match=r"no stability_probe_summary record; run `python -m "
                       r"batchsize_study experiment=stability_probe` first"):  # fmt: skip
        run(cfg_factory("experiment=small_batch", "y_from=probe"))
    with pytest.raises(ConfigError, match=r"^y_from='guess': use rule or probe"):
        run(cfg_factory("experiment=small_batch", "y_from=guess"))
