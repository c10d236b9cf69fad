"""The statistics every stage shares: one EMA, one median, intervals and tests (scipy.stats),
and the paired bootstrap. Pure functions of numbers; no files, no Lightning.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps


@dataclass
class EMA:
    """Bias-corrected exponential moving average (Kingma & Ba 2015, Adam, Sec. 3):
    s_t = beta s_{t-1} + (1 - beta) x_t, reported as s_t / (1 - beta^t).

    Non-finite inputs are skipped (the average carries over): one rule for the detector, the
    report and the ladder. ``value`` is NaN until the first finite input.
    """

    beta: float
    _avg: float = 0.0
    _n: int = 0

    def update(self, x: float) -> float:
        if math.isfinite(x):
            self._n += 1
            self._avg = self.beta * self._avg + (1.0 - self.beta) * x
        return self.value

    @property
    def value(self) -> float:
        if not self._n:
            return math.nan
        return self._avg / (1.0 - self.beta**self._n) if self.beta > 0 else self._avg

    @property
    def count(self) -> int:
        return self._n

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "avg": self._avg, "n": self._n}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta, self._avg, self._n = float(state["beta"]), float(state["avg"]), int(state["n"])


def ema(values: Iterable[float], beta: float) -> np.ndarray:
    """:class:`EMA` over a series: NaN before the first finite value."""
    e = EMA(beta)
    return np.array([e.update(float(v)) for v in values], dtype=float)


def median(values: Iterable[float]) -> float:
    """The median (the mean of the two middle values for an even count): one definition for
    every place that summarises several records by a middle value."""
    return float(statistics.median(list(values)))


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample sd / sqrt(n)); se is inf for fewer than 2 values."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.inf
    if len(x) < 2:
        return float(x[0]), math.inf
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def t_quantile(level: float, df: int) -> float:
    """Two-sided critical value of Student's t: P(|T| <= t) = level."""
    return float(sps.t.ppf(0.5 + level / 2.0, df))


def mean_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``samples`` (seeds x points): mean and the t interval of the mean
    (Student 1908), scipy.stats.t.interval with scale sd / sqrt(n), n - 1 degrees of freedom.

    n is the number of seeds (rows) for every column, NaNs included, as curves have always been
    drawn. A column without spread collapses to its mean (scipy's scale must be positive, and
    there is no spread to estimate); one with fewer than two values has NaN ends. With one seed
    every column collapses.
    """
    mean = np.nanmean(samples, axis=0)
    n = samples.shape[0]
    if n < 2:
        return mean, mean.copy(), mean.copy()
    se = np.nanstd(samples, axis=0, ddof=1) / math.sqrt(n)
    spread = se > 0
    lo, hi = sps.t.interval(level, n - 1, loc=mean, scale=np.where(spread, se, 1.0))
    flat = np.where(se == 0, mean, np.nan)
    return mean, np.where(spread, lo, flat), np.where(spread, hi, flat)


def paired_test(diffs: list[float], level: float) -> dict[str, Any] | None:
    """Paired t-test on per-seed differences (large - small): is the mean difference larger than
    the seed-to-seed spread? (Student 1908; the paired form removes the shared seed effect.) It
    is the one-sample t-test of the differences against 0, scipy.stats.ttest_1samp, with its
    ``confidence_interval`` at ``level``.

    None with fewer than two pairs. Identical differences (sd = 0) carry no estimate of the
    spread: the test is then undefined (t, p and the interval are None), never p = 0.
    """
    d = [x for x in diffs if math.isfinite(x)]
    n = len(d)
    if n < 2:
        return None
    mean = statistics.fmean(d)
    sd = statistics.stdev(d)
    out: dict[str, Any] = {
        "n_seeds": n,
        "mean_difference": mean,
        "sd_difference": sd,
        "df": n - 1,
        "level": level,
    }
    if not sd > 0:
        out.update(
            t=None,
            p_value=None,
            interval=None,
            significant=False,
            undefined="identical differences across seeds: no spread to test against",
        )
        return out
    res = sps.ttest_1samp(d, 0.0)
    ci = res.confidence_interval(level)
    p = float(res.pvalue)
    out.update(
        t=float(res.statistic),
        p_value=p,
        interval=[float(ci.low), float(ci.high)],
        significant=bool(p < 1.0 - level),
    )
    return out


def welch_test(a: Sequence[float], b: Sequence[float], level: float) -> dict[str, Any] | None:
    """Welch's unequal-variance t-test of mean(b) - mean(a) for two unpaired groups (Welch 1947,
    "The generalization of Student's problem when several different population variances are
    involved"; Welch-Satterthwaite degrees of freedom), via scipy.stats.ttest_ind.

    None with fewer than two values in either group. When both groups have no spread the test
    is undefined (t, p and the interval are None), never p = 0.
    """
    x = [v for v in a if math.isfinite(v)]
    y = [v for v in b if math.isfinite(v)]
    if len(x) < 2 or len(y) < 2:
        return None
    mean = statistics.fmean(y) - statistics.fmean(x)
    out: dict[str, Any] = {"n_small": len(x), "n_large": len(y), "mean_difference": mean}
    out["level"] = level
    if not (statistics.stdev(x) > 0 or statistics.stdev(y) > 0):
        out.update(
            t=None,
            df=None,
            p_value=None,
            interval=None,
            significant=False,
            undefined="no spread within either group: nothing to test against",
        )
        return out
    res = sps.ttest_ind(y, x, equal_var=False)
    ci = res.confidence_interval(level)
    p = float(res.pvalue)
    out.update(
        t=float(res.statistic),
        df=float(res.df),
        p_value=p,
        interval=[float(ci.low), float(ci.high)],
        significant=bool(p < 1.0 - level),
    )
    return out


BOOTSTRAP_CHUNK = 2_000_000
"""Indices a bootstrap draws at once: whole resamples, so a chunk holds 16 MB of indices and
16 MB of gathered values whatever the number of items (one resample of more items is one chunk).
Drawing all resamples at once took 2.4 GB at 15,000 windows and 10,000 resamples."""


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Percentile bootstrap interval of mean(b - a) over paired items (Efron & Tibshirani 1993,
    ch. 13): items (e.g. test windows both models were scored on) are resampled with
    replacement, so the interval carries the items' variability and their pairing.

    Memory is bounded by :data:`BOOTSTRAP_CHUNK`: resamples are drawn a chunk of rows at a time.
    ``Generator.integers`` fills its output in order from the bit generator, so the chunks are
    the rows of the one ``(resamples, n)`` draw this function used to make: the interval for a
    seed is unchanged (tests/test_stats.py checks it against that draw).
    """
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 2:
        raise ValueError("a paired bootstrap needs at least two finite pairs")
    rng = np.random.default_rng(seed)
    rows = max(1, BOOTSTRAP_CHUNK // n)
    means = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "mean": float(d.mean()),
        "se": float(d.std(ddof=1) / math.sqrt(n)),
        "low": float(lo),
        "high": float(hi),
        "level": level,
        "n": int(n),
        "resamples": resamples,
    }


def fmt(x: Any, spec: str = ".4f") -> str:
    """A number for text: ``n/a`` for None and non-finite values."""
    if x is None:
        return "n/a"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return format(v, spec) if math.isfinite(v) else "n/a"


def json_safe(obj: Any) -> Any:
    """JSON without NaN (not valid JSON): NaN and infinities become null; numpy scalars and
    tuples become plain JSON values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj
