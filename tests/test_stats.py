"""The shared statistics (batchsize_study.stats) and the B_crit fit (batchsize_study.ladder):
bounded memory for the bootstrap, and scipy's tests and intervals giving the numbers the
hand-written formulas gave (the known values below are those formulas' output)."""

from __future__ import annotations

import math
import statistics
import tracemalloc

import numpy as np
import pytest
from scipy import stats as sps
from scipy.optimize import curve_fit

from batchsize_study import stats
from batchsize_study.ladder import fit_critical_batch

# ---------------------------------------------------------------- paired bootstrap

A = [4.02, 1.722, 3.209, 2.716, 2.774, 2.892, 1.99, 2.884, 2.567, 4.661, 3.113, 2.824, 2.859]
A += [2.666, 2.472, 2.805, 3.241]
B = [3.923, 1.864, 3.119, 2.671, 3.033, 2.951, 1.839, 2.797, 2.625, 4.999, 3.009, 2.725, 3.01]
B += [2.439, 2.364, 2.931, 3.307]


def _one_draw_bootstrap(a, b, level, resamples, seed):
    """The former paired_bootstrap: every resample's indices drawn at once."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    return np.quantile(d[idx].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])


def test_paired_bootstrap_memory_is_bounded() -> None:
    """15,000 windows x 10,000 resamples drew 150M indices at once (2.4 GB with the gather)."""
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 0.5, size=15_000)
    b = a + rng.normal(-0.05, 0.2, size=15_000)
    tracemalloc.start()
    try:
        out = stats.paired_bootstrap(a, b, 0.95, resamples=10_000, seed=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 300e6, f"peak {peak / 1e6:.0f} MB"
    assert out["low"] < out["mean"] < out["high"] and out["resamples"] == 10_000


@pytest.mark.parametrize("chunk", [50, 17, 1_000_000])  # 2 rows, 1 row, all rows per chunk
def test_paired_bootstrap_keeps_the_one_draw_stream(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drawing in chunks consumes the generator as the one (resamples, n) draw did: the same
    interval to the bit, for any chunk size (an uneven last chunk included)."""
    monkeypatch.setattr(stats, "BOOTSTRAP_CHUNK", chunk, raising=False)
    out = stats.paired_bootstrap(A, B, 0.95, 1001, 7)
    lo, hi = _one_draw_bootstrap(A, B, 0.95, 1001, 7)
    assert (out["low"], out["high"]) == (lo, hi)
    # the former implementation's output for this input (resamples=1000, seed=7)
    known = stats.paired_bootstrap(A, B, 0.95, 1000, 7)
    assert known["low"] == pytest.approx(-0.0585514705882352, rel=1e-12)
    assert known["high"] == pytest.approx(0.0839588235294117, rel=1e-12)
    assert known["mean"] == pytest.approx(0.011235294117647076, rel=1e-12)
    assert known["se"] == pytest.approx(0.03752132035215255, rel=1e-12)


# ---------------------------------------------------------------- t-test and t interval


def _hand_paired_test(d: list[float], level: float) -> tuple[float, float, float, float]:
    """The former paired_test's arithmetic: t, p and the interval's ends."""
    n = len(d)
    mean, se = sum(d) / n, statistics.stdev(d) / math.sqrt(n)
    t = mean / se
    half = stats.t_quantile(level, n - 1) * se
    p = 2.0 * sps.t.sf(abs(t), n - 1)
    return t, p, mean - half, mean + half


@pytest.mark.parametrize(
    ("diffs", "level", "known"),
    [
        # t, p, interval of the hand-written test
        (
            [-0.10, -0.11, -0.09],
            0.95,
            (-17.32050807568877, 0.003316758722356861, -0.12484137711750332, -0.07515862288249672),
        ),
        (
            [0.3, -0.1, 0.25, 0.05],
            0.9,
            (1.3525044520011484, 0.26912777537515137, -0.092500525720989, 0.342500525720989),
        ),
    ],
)
def test_paired_test_is_scipys_and_matches_the_hand_written_one(
    diffs: list[float], level: float, known: tuple[float, ...]
) -> None:
    out = stats.paired_test(diffs, level)
    assert out is not None and out["df"] == len(diffs) - 1
    got = (out["t"], out["p_value"], *out["interval"])
    assert got == pytest.approx(known, rel=1e-12)
    rng = np.random.default_rng(5)
    for n in (2, 3, 7, 40):
        d = rng.normal(0.1, 0.3, size=n).tolist()
        out = stats.paired_test(d, 0.95)
        assert (out["t"], out["p_value"], *out["interval"]) == pytest.approx(
            _hand_paired_test(d, 0.95), rel=1e-10
        )
        assert out["mean_difference"] == pytest.approx(statistics.fmean(d), rel=1e-12)
    same = stats.paired_test([0.2, 0.2, 0.2], 0.95)
    assert same["t"] is None and same["interval"] is None and not same["significant"]
    assert stats.paired_test([0.2, math.nan], 0.95) is None


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:Degrees of freedom <= 0")
def test_mean_interval_is_the_t_interval_the_hand_formula_gave() -> None:
    # columns: spread, no spread (collapses), spread, a NaN (n counts every seed, as before)
    s = np.array([[1.0, 2.0, 3.0, np.nan], [1.5, 2.0, 2.0, 4.0], [0.5, 2.0, 4.5, 5.0]])
    mean, lo, hi = stats.mean_interval(s, 0.9)
    assert mean.tolist() == pytest.approx([1.0, 2.0, 3.1666666666666665, 4.5], rel=1e-12)
    assert lo.tolist() == pytest.approx(
        [0.15707276957647576, 2.0, 1.045346323107025, 3.307920878641461], rel=1e-12
    )
    assert hi.tolist() == pytest.approx(
        [1.8429272304235242, 2.0, 5.287987010226308, 5.692079121358539], rel=1e-12
    )
    x = np.random.default_rng(2).normal(size=(5, 9))
    x[1, 3] = np.nan
    x[:, 5] = np.nan  # no value: NaN
    x[1:, 6] = np.nan  # one value: no spread to estimate, NaN ends
    x[:, 7] = 0.25  # no spread: the mean
    mean, lo, hi = stats.mean_interval(x, 0.95)
    half = stats.t_quantile(0.95, 4) * np.nanstd(x, axis=0, ddof=1) / math.sqrt(5)
    np.testing.assert_allclose(lo, mean - half, rtol=1e-12)  # NaNs in the same places
    np.testing.assert_allclose(hi, mean + half, rtol=1e-12)
    assert np.isnan(lo[6]) and lo[7] == hi[7] == 0.25
    one = stats.mean_interval(x[:1], 0.95)
    assert np.array_equal(one[1], one[0], equal_nan=True)


# ---------------------------------------------------------------- the B_crit fit

BS = [8, 16, 32, 64, 128, 256]
STEPS = [1000, 560, 350, 230, 170, 150]


def _hand_fit(bs: list[float], steps: list[float]) -> tuple[float, float]:
    """The former fit_critical_batch's least squares in 1/B: (S_min, B_crit)."""
    x = [1.0 / b for b in bs]
    mx, my = statistics.fmean(x), statistics.fmean(steps)
    slope = sum((u - mx) * (v - my) for u, v in zip(x, steps)) / sum((u - mx) ** 2 for u in x)
    a = my - slope * mx
    return a, slope / a


def test_fit_critical_batch_matches_the_hand_written_least_squares() -> None:
    fit = fit_critical_batch(BS, STEPS)
    assert fit is not None
    assert fit["s_min"] == pytest.approx(121.34328358208955, rel=1e-12)  # the former output
    assert fit["b_crit"] == pytest.approx(57.99847712762841, rel=1e-12)
    rng = np.random.default_rng(11)
    for _ in range(20):
        steps = [200 * (1 + 40 / b) * math.exp(rng.normal(0, 0.1)) for b in BS]
        fit = fit_critical_batch(BS, steps)
        assert (fit["s_min"], fit["b_crit"]) == pytest.approx(_hand_fit(BS, steps), rel=1e-12)


def test_fit_critical_batch_interval_is_the_fits_covariance() -> None:
    """b_crit_se equals the standard error of B_crit fitted directly in S = S_min (1 + B_crit/B)
    (curve_fit's covariance): the delta method is exact for this reparametrisation."""
    fit = fit_critical_batch(BS, STEPS, level=0.9)
    assert fit["level"] == 0.9 and fit["df"] == len(BS) - 2
    assert fit["b_crit_lo"] < fit["b_crit"] < fit["b_crit_hi"]
    # symmetric on the log scale: the ends are B_crit exp(-/+ t se_log)
    assert fit["b_crit_lo"] * fit["b_crit_hi"] == pytest.approx(fit["b_crit"] ** 2, rel=1e-12)
    t = stats.t_quantile(0.9, len(BS) - 2)
    se_log = fit["b_crit_se"] / fit["b_crit"]
    assert fit["b_crit_hi"] == pytest.approx(fit["b_crit"] * math.exp(t * se_log), rel=1e-12)
    x = np.array(BS, dtype=float)
    popt, pcov = curve_fit(lambda b, s, c: s * (1 + c / b), x, np.array(STEPS, float), p0=(100, 50))
    assert popt[1] == pytest.approx(fit["b_crit"], rel=1e-6)
    assert math.sqrt(pcov[1, 1]) == pytest.approx(fit["b_crit_se"], rel=1e-5)


def test_fit_critical_batch_interval_covers_and_degenerates_cleanly() -> None:
    # exact data: no residual spread, the interval collapses onto B_crit
    exact = fit_critical_batch(BS, [100 * (1 + 64 / b) for b in BS])
    assert exact["b_crit_lo"] == pytest.approx(64) and exact["b_crit_hi"] == pytest.approx(64)
    # no gain from larger batches: B_crit = 0, no log, no interval
    flat = fit_critical_batch([8, 16, 32], [100, 100, 100])
    assert flat["b_crit"] == 0 and flat["b_crit_lo"] is None and flat["b_crit_hi"] is None
    assert fit_critical_batch([8, 16, 32], [10, 20, 30]) is None  # non-physical
    assert fit_critical_batch([8, 16, 16], [200, 120, 121]) is None  # two batch sizes
    # coverage on simulated ladders with equal noise on every rung (sd 5 steps, the least
    # squares' assumption): near the nominal 95 %. (Noise proportional to S gives ~92 %.)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(1000):
        steps = [150 * (1 + 50 / b) + rng.normal(0, 5.0) for b in BS]
        f = fit_critical_batch(BS, steps)
        hits += f is not None and f["b_crit_lo"] <= 50 <= f["b_crit_hi"]
    assert 0.93 <= hits / 1000 <= 0.97, hits
