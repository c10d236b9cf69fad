"""``experiment=compare``: a study's metrics.csv files -> aligned curves, plots, a verdict.

The seed's question is per optimizer step ("a lower loss in a given amount of steps"); the
compute-fair question is per token seen (the large batch sees B_large/B_small times more tokens
per step). Both are answered. At matched steps the validation loss is used where both runs have
it, a smoothed training loss otherwise. Several seeds per configuration give a mean and a 95 %
interval per step and a paired t-test across seeds at the final step; one seed gives a verdict
that says it rests on one seed.

The report is a list of *sections* (:data:`SECTIONS`); each builder takes the loaded
:class:`Study` and a :class:`ReportContext` and returns a :class:`Section` (markdown, a JSON
object stored under its key in comparison.json, plot files). A new section is one function
appended with :func:`register_section`. Everything is written under ``<study.dir>/report/`` only.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from batchsize_study.config import CompareConfig
from batchsize_study.errors import UserError
from batchsize_study.study import read_records, write_json_atomic

log = logging.getLogger(__name__)

REPORT_DIR = "report"
COMPARED = ("small_batch", "large_batch")
HYPOTHESIS = "a larger batch gives a lower loss in a given number of optimizer steps"


# ---------------------------------------------------------------- settings


# ---------------------------------------------------------------- statistics


def ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected EMA (Kingma & Ba 2015, Adam, Sec. 3): s_t = beta*s_{t-1} + (1-beta)*x_t,
    reported as s_t / (1 - beta^t). Non-finite values are skipped (the average carries over)."""
    out = np.full(len(values), np.nan)
    avg, n = 0.0, 0
    for i, v in enumerate(values):
        if math.isfinite(v):
            n += 1
            avg = beta * avg + (1.0 - beta) * v
        if n:
            out[i] = avg / (1.0 - beta**n) if beta > 0 else avg
    return out


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Press et al., Numerical Recipes,
    3rd ed., Sec. 6.4, modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (Numerical Recipes, Sec. 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)
    (Abramowitz & Stegun 26.7.1 with 26.5.27)."""
    if not math.isfinite(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(level: float, df: int) -> float:
    """The two-sided critical value t with P(|T| <= t) = level (bisection on the exact CDF)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > 1.0 - level:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``samples`` (seeds x points): mean and the t interval of the mean.

    With one seed the interval collapses to the mean (there is no spread to estimate)."""
    mean = np.nanmean(samples, axis=0)
    n = samples.shape[0]
    if n < 2:
        return mean, mean.copy(), mean.copy()
    half = t_quantile(level, n - 1) * np.nanstd(samples, axis=0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_test(diffs: list[float], level: float) -> dict[str, Any] | None:
    """Paired t-test on per-seed differences (large - small): is the mean difference larger than
    the seed-to-seed spread? (Student 1908; the paired form removes the shared seed effect.)"""
    d = [x for x in diffs if math.isfinite(x)]
    n = len(d)
    if n < 2:
        return None
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    t = mean / se if se > 0 else (math.inf if mean else 0.0)
    half = t_quantile(level, n - 1) * se
    p = t_two_sided_p(t, n - 1)
    return {
        "n_seeds": n,
        "mean_difference": mean,
        "sd_difference": sd,
        "t": t if math.isfinite(t) else None,
        "df": n - 1,
        "p_value": p,
        "interval": [mean - half, mean + half],
        "level": level,
        "significant": bool(p < 1.0 - level),
    }


# ---------------------------------------------------------------- loading


@dataclass
class Run:
    """One run's record and its curves (numpy arrays, one entry per optimizer step / val point)."""

    record: dict[str, Any]
    step: np.ndarray
    tokens: np.ndarray
    lr: np.ndarray
    train_loss: np.ndarray
    smoothed: np.ndarray
    detector_smoothed: np.ndarray
    val_step: np.ndarray
    val_tokens: np.ndarray
    val_loss: np.ndarray

    @property
    def experiment(self) -> str:
        return str(self.record["experiment"])

    @property
    def batch_size(self) -> int:
        return int(self.record["batch_size"])

    @property
    def seed(self) -> int:
        return int(self.record.get("seed", 0))

    @property
    def run_id(self) -> str:
        return str(self.record.get("run_id") or Path(self.record["_path"]).parent.name)

    @property
    def tokens_per_step(self) -> int:
        tps = self.record.get("tokens_per_step")
        return int(tps) if tps else int(self.batch_size * self.record.get("seq_len", 1))

    def smoothed_at(self, x: np.ndarray, by: str) -> np.ndarray:
        """Smoothed train loss interpolated at steps or tokens ``x`` (nan outside the run)."""
        xs = self.step if by == "step" else self.tokens
        return np.interp(x, xs, self.smoothed, left=np.nan, right=np.nan)

    def val_at(self, x: float, by: str) -> float | None:
        """Validation loss at exactly this step / token count, if the run evaluated there."""
        xs = self.val_step if by == "step" else self.val_tokens
        hit = np.nonzero(xs == x)[0]
        return float(self.val_loss[hit[-1]]) if len(hit) else None


def _f(s: str | None) -> float:
    try:
        return float(s) if s not in (None, "") else math.nan
    except ValueError:
        return math.nan


def load_run(record: dict[str, Any], ema_beta: float) -> Run | None:
    """Read the run's metrics.csv (next to its result.json, so a moved study still reads)."""
    path = Path(record["_path"]).parent / "metrics.csv"
    if not path.exists():
        log.warning("skipping %s: no metrics.csv", path.parent)
        return None
    train: dict[int, tuple[float, float, float, float]] = {}
    val: dict[int, tuple[float, float]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = _f(row.get("step"))
            if not math.isfinite(step):
                continue
            if row.get("train_loss") not in (None, ""):  # a resumed run: the last row wins
                train[int(step)] = (
                    _f(row.get("tokens")),
                    _f(row.get("lr")),
                    _f(row.get("train_loss")),
                    _f(row.get("smoothed_loss")),
                )
            elif row.get("val_loss") not in (None, ""):
                val[int(step)] = (_f(row.get("tokens")), _f(row.get("val_loss")))
    if not train:
        log.warning("skipping %s: metrics.csv has no training rows", path.parent)
        return None
    steps = sorted(train)
    cols = np.array([train[s] for s in steps], dtype=float).reshape(-1, 4)
    vsteps = sorted(val)
    vcols = np.array([val[s] for s in vsteps], dtype=float).reshape(-1, 2)
    return Run(
        record=record,
        step=np.array(steps, dtype=float),
        tokens=cols[:, 0],
        lr=cols[:, 1],
        train_loss=cols[:, 2],
        smoothed=ema(cols[:, 2], ema_beta),
        detector_smoothed=cols[:, 3],
        val_step=np.array(vsteps, dtype=float),
        val_tokens=vcols[:, 0],
        val_loss=vcols[:, 1],
    )


@dataclass
class Group:
    """The runs of one (experiment, batch size): one per seed."""

    experiment: str
    batch_size: int
    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def label(self) -> str:
        kind = {"small_batch": "small batch", "large_batch": "large batch"}.get(
            self.experiment, self.experiment
        )
        return f"{kind} {self.batch_size}"

    def curve(self, by: str, level: float) -> dict[str, np.ndarray]:
        """Mean smoothed train loss over seeds with its interval, on the steps (or tokens) that
        every seed reached."""
        n = min(len(r.step) for r in self.runs)
        ref = self.runs[0]
        x = (ref.step if by == "step" else ref.tokens)[:n]
        ys = np.vstack([r.smoothed_at(x, by) for r in self.runs])
        mean, lo, hi = mean_interval(ys, level)
        return {"x": x, "mean": mean, "lo": lo, "hi": hi, "n": np.array(len(self.runs))}

    def val_curve(self, by: str, level: float) -> dict[str, np.ndarray]:
        """Mean validation loss over seeds at the validation points every seed has."""
        key = "val_step" if by == "step" else "val_tokens"
        common = set(getattr(self.runs[0], key).tolist())
        for r in self.runs[1:]:
            common &= set(getattr(r, key).tolist())
        x = np.array(sorted(common), dtype=float)
        ys = np.array([[r.val_at(v, by) for v in x] for r in self.runs], dtype=float)
        if len(x) == 0:
            e = np.array([], dtype=float)
            return {"x": e, "mean": e, "lo": e, "hi": e}
        mean, lo, hi = mean_interval(ys.reshape(len(self.runs), -1), level)
        return {"x": x, "mean": mean, "lo": lo, "hi": hi}


@dataclass
class Study:
    """Everything compare knows about one study folder."""

    dir: Path
    records: list[dict[str, Any]]
    runs: list[Run]
    small: Group
    large: list[Group]
    superconvergence: list[Run]
    ignored: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[Group]:
        return [self.small, *self.large]


def _first_command(sdir: Path) -> str:
    return (
        f"`python -m batchsize_study -m experiment=superconvergence,small_batch,large_batch "
        f"study.dir={sdir}`"
    )


def load_study(study_dir: str | Path, ema_beta: float = 0.9) -> Study:
    """Read every record of the study, keep the latest completed run per (experiment, batch size,
    seed) of the configuration of the latest small_batch run, and group them.

    Raises UserError (one line, what to run first) when there is nothing to compare."""
    sdir = Path(study_dir).expanduser().resolve()
    if not (sdir / "runs").is_dir():
        raise UserError(
            f"study.dir={sdir}: no study records there (no runs/ folder); run {_first_command(sdir)} first"
        )
    records = read_records(sdir)
    done = [
        r for r in records if r.get("experiment") in COMPARED and r.get("status") == "completed"
    ]
    missing = [e for e in COMPARED if not any(r["experiment"] == e for r in done)]
    if missing:
        found = ", ".join(f"{r['experiment']}:{r.get('status')}" for r in records) or "none"
        raise UserError(
            f"study.dir={sdir}: no completed {' or '.join(missing)} record (found: {found}); "
            f"run {_first_command(sdir)} first"
        )
    key = [r for r in done if r["experiment"] == "small_batch"][-1].get("compat_key")
    ignored = [
        f"{Path(r['_path']).parent.name} ({r['experiment']}, status {r.get('status')})"
        for r in records
        if r.get("experiment") in COMPARED and r not in done
    ]
    latest: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in done:
        if r.get("compat_key") != key:
            ignored.append(f"{Path(r['_path']).parent.name} (another model/data configuration)")
            continue
        k = (r["experiment"], int(r["batch_size"]), int(r.get("seed", 0)))
        if k in latest:
            ignored.append(f"{Path(latest[k]['_path']).parent.name} (superseded by a later run)")
        latest[k] = r  # records are oldest first
    runs = [run for r in latest.values() if (run := load_run(r, ema_beta)) is not None]
    sc_records = [
        r
        for r in records
        if r.get("experiment") == "superconvergence" and r.get("compat_key") in (key, None)
    ]
    sc_runs = [run for r in sc_records if (run := load_run(r, ema_beta)) is not None]

    by_group: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        by_group.setdefault((run.experiment, run.batch_size), []).append(run)
    for v in by_group.values():
        v.sort(key=lambda r: r.seed)
    smalls = sorted(k for k in by_group if k[0] == "small_batch")
    larges = sorted(k for k in by_group if k[0] == "large_batch")
    if not smalls or not larges:
        raise UserError(
            f"study.dir={sdir}: the small_batch and large_batch records have no readable metrics.csv; "
            f"run {_first_command(sdir)} first"
        )
    # Several small batch sizes: the baseline is the one the large runs derived their LR from.
    derived = [
        r.record.get("derivation", {}).get("small_batch_size") for k in larges for r in by_group[k]
    ]
    base = max(smalls, key=lambda k: (derived.count(k[1]), len(by_group[k])))
    for k in smalls:
        if k != base:
            ignored.append(f"small_batch batch_size={k[1]} (the large runs derive from {base[1]})")
    for item in ignored:
        log.warning("compare: not compared: %s", item)
    return Study(
        dir=sdir,
        records=records,
        runs=runs,
        small=Group(*base, by_group[base]),
        large=[Group(*k, by_group[k]) for k in larges if k[1] != base[1]]
        or [Group(*k, by_group[k]) for k in larges],
        superconvergence=sc_runs,
        ignored=ignored,
    )


# ---------------------------------------------------------------- comparison


def _ranges(xs: np.ndarray) -> list[list[int]]:
    """[[first, last], ...] runs of consecutive steps (or grid points) in ``xs``."""
    out: list[list[int]] = []
    for x in xs.astype(int).tolist():
        if out and x == out[-1][1] + 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return out


def _fmt_ranges(ranges: list[list[int]]) -> str:
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges) or "none"


def _pairs(small: Group, large: Group) -> list[tuple[Run, Run]]:
    """Runs paired by seed (callers fall back to every small run x every large run, untested,
    when the two groups share no seed)."""
    by_seed = {r.seed: r for r in small.runs}
    paired = [(by_seed[r.seed], r) for r in large.runs if r.seed in by_seed]
    return paired


def compare_view(small: Group, large: Group, by: str, s: CompareConfig) -> dict[str, Any]:
    """large - small along steps or tokens: where the large batch is lower, by how much, and the
    final matched point (validation loss where both have it there, smoothed train loss otherwise)."""
    pairs = _pairs(small, large)
    unpaired = not pairs
    if unpaired:
        pairs = [(a, b) for a in small.runs for b in large.runs]
    # The grid: the small run's points within the range every run covers (per token the small
    # batch has the finer grid; the large run is interpolated onto it).
    lo = max(float((r.step if by == "step" else r.tokens)[0]) for p in pairs for r in p)
    hi = min(float((r.step if by == "step" else r.tokens)[-1]) for p in pairs for r in p)
    ref = pairs[0][0]
    grid_all = ref.step if by == "step" else ref.tokens
    grid = grid_all[(grid_all >= lo) & (grid_all <= hi)]
    diffs = np.vstack([b.smoothed_at(grid, by) - a.smoothed_at(grid, by) for a, b in pairs])
    mean, dlo, dhi = mean_interval(diffs, s.confidence)
    small_mean = np.nanmean(np.vstack([a.smoothed_at(grid, by) for a, _ in pairs]), axis=0)
    lower = mean < 0
    unit = "step" if by == "step" else "tokens"
    steps_of_grid = np.interp(grid, grid_all, ref.step) if by != "step" else grid
    out: dict[str, Any] = {
        "axis": unit,
        "paired_seeds": sorted({a.seed for a, _ in pairs}) if not unpaired else [],
        "unpaired": unpaired,
        "range": [lo, hi] if len(grid) else None,
        "points": len(grid),
        "fraction_lower": float(np.mean(lower)) if len(grid) else None,
        # per token the ranges are in the small run's steps (its grid), named as such
        "lower_ranges_small_steps": _ranges(steps_of_grid[lower]),
        "grid": grid.tolist(),
        "difference_mean": mean.tolist(),
        "difference_lo": dlo.tolist(),
        "difference_hi": dhi.tolist(),
    }
    if len(grid):
        rel = mean / small_mean
        i_best = int(np.nanargmin(mean))
        # where large - small is smallest: the large batch's biggest lead when negative
        out["min_difference"] = {
            unit: float(grid[i_best]),
            "difference": float(mean[i_best]),
            "relative": float(rel[i_best]),
        }
        out["final"] = _final_point(pairs, float(grid[-1]), by, s, paired=not unpaired)
    return out


def _final_point(
    pairs: list[tuple[Run, Run]], x: float, by: str, s: CompareConfig, paired: bool = True
) -> dict[str, Any]:
    vals = [(a.val_at(x, by), b.val_at(x, by)) for a, b in pairs]
    use_val = all(va is not None and vb is not None for va, vb in vals)
    if use_val:
        small_v = [float(va) for va, _ in vals]  # type: ignore[arg-type]
        large_v = [float(vb) for _, vb in vals]  # type: ignore[arg-type]
        metric = "val_loss"
    else:
        small_v = [float(a.smoothed_at(np.array([x]), by)[0]) for a, _ in pairs]
        large_v = [float(b.smoothed_at(np.array([x]), by)[0]) for _, b in pairs]
        metric = "smoothed_train_loss"
    d = [lv - sv for sv, lv in zip(small_v, large_v)]
    small_m, large_m = float(np.mean(small_v)), float(np.mean(large_v))
    return {
        "at": x,
        "metric": metric,
        "small": small_m,
        "large": large_m,
        "difference": large_m - small_m,
        "relative": (large_m - small_m) / small_m if small_m else None,
        "per_seed_difference": d,
        "large_lower": large_m < small_m,
        "test": paired_test(d, s.confidence) if paired else None,
        "paired": paired,
    }


def matched_points(small: Group, large: Group, s: CompareConfig) -> list[dict[str, Any]]:
    """Rows of the matched-steps table: evenly spaced steps plus every validation step both
    have; the validation loss where both evaluated, the smoothed train loss otherwise."""
    pairs = _pairs(small, large) or [(a, b) for a in small.runs for b in large.runs]
    last = int(min(min(a.step[-1], b.step[-1]) for a, b in pairs))
    even = {int(round(v)) for v in np.linspace(1, last, max(2, s.table_points))}
    vals = set(small.val_curve("step", s.confidence)["x"].astype(int).tolist()) & set(
        large.val_curve("step", s.confidence)["x"].astype(int).tolist()
    )
    rows = []
    for step in sorted(even | {v for v in vals if v <= last}):
        p = _final_point(pairs, float(step), "step", s)
        rows.append(
            {
                "step": step,
                "metric": p["metric"],
                "small": p["small"],
                "large": p["large"],
                "difference": p["difference"],
                "relative": p["relative"],
            }
        )
    return rows


def diagnose(run: Run, tolerance: float) -> dict[str, Any]:
    """Tell overfitting from destabilisation (the seed's distinction): overfitting is a
    validation loss that rises above its minimum while the training loss keeps falling; a
    destabilisation is a training loss that rises too."""
    out: dict[str, Any] = {"run_id": run.run_id, "flag": None}
    if len(run.val_loss) < 2 or not np.isfinite(run.val_loss).any():
        out["note"] = "fewer than two validation points: nothing to tell"
        return out
    i_min = int(np.nanargmin(run.val_loss))
    best, last = float(run.val_loss[i_min]), float(run.val_loss[-1])
    step_min, step_last = float(run.val_step[i_min]), float(run.val_step[-1])
    tr_min = float(run.smoothed_at(np.array([step_min]), "step")[0])
    tr_last = float(run.smoothed_at(np.array([step_last]), "step")[0])
    rise = (last - best) / best if best else 0.0
    out.update(
        val_min_step=step_min,
        val_min=best,
        val_last=last,
        val_rise=rise,
        train_at_val_min=tr_min,
        train_last=tr_last,
    )
    if not math.isfinite(last) or (rise > tolerance and tr_last >= tr_min):
        out["flag"] = "destabilised"
        out["note"] = (
            f"validation loss rose {rise:+.1%} after step {step_min:.0f} and the training loss "
            f"did not fall ({tr_min:.4f} -> {tr_last:.4f}): a destabilisation, not overfitting"
        )
    elif rise > tolerance:
        out["flag"] = "overfitting"
        out["note"] = (
            f"validation loss rose {rise:+.1%} after step {step_min:.0f} while the training loss "
            f"fell ({tr_min:.4f} -> {tr_last:.4f}): overfitting"
        )
    return out


def supports(final: dict[str, Any], n_seeds: int) -> str:
    """supported / not supported / inconclusive, from the final matched point."""
    test = final.get("test")
    if test is not None and not test["significant"]:
        return "inconclusive"
    return "supported" if final["large_lower"] else "not supported"


# ---------------------------------------------------------------- sections


@dataclass
class Section:
    """One part of the report: markdown for report.md, JSON for comparison.json[key], and the
    PNG files it wrote (names relative to the report folder)."""

    key: str
    title: str
    markdown: str
    data: Any = None
    plots: list[str] = field(default_factory=list)


@dataclass
class ReportContext:
    """What a section builder gets besides the study: settings, the output folder, and the
    results of earlier sections (by key), so a later section can reuse them."""

    out_dir: Path
    settings: CompareConfig
    results: dict[str, Any] = field(default_factory=dict)

    def save(self, fig: Any, name: str) -> str:
        """Write a matplotlib Figure as PNG into the report folder; return its file name."""
        fig.savefig(self.out_dir / name, dpi=self.settings.dpi, bbox_inches="tight")
        return name


SectionBuilder = Callable[[Study, ReportContext], "Section | None"]
SECTIONS: list[SectionBuilder] = []


def register_section(builder: SectionBuilder, before: str | None = None) -> SectionBuilder:
    """Add a section builder to every report (after the others, or before the builder named
    ``before``). Usable as a decorator."""
    names = [b.__name__ for b in SECTIONS]
    if builder.__name__ in names:
        SECTIONS[names.index(builder.__name__)] = builder
    elif before is not None and before in names:
        SECTIONS.insert(names.index(before), builder)
    else:
        SECTIONS.append(builder)
    return builder


def _num(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def _short_source(src: str | None) -> str:
    """lr_source without the record paths (they are in comparison.json)."""
    if not src:
        return "n/a"
    return re.sub(r" from /\S+(, /\S+)*", "", src).replace("|", "/")


def run_rows(study: Study) -> list[dict[str, Any]]:
    """One row per run of the study (superconvergence included), for the table."""
    rows = []
    shown = {r.run_id for r in study.runs} | {r.run_id for r in study.superconvergence}
    for rec in study.records:
        rid = rec.get("run_id") or Path(rec["_path"]).parent.name
        if rid not in shown:
            continue
        ppl = rec.get("final_val_ppl")
        if ppl is None and rec.get("final_val_loss") is not None:
            ppl = math.exp(min(rec["final_val_loss"], 700))
        rows.append(
            {
                "run_id": rid,
                "experiment": rec.get("experiment"),
                "status": rec.get("status"),
                "seed": rec.get("seed"),
                "batch_size": rec.get("batch_size"),
                "micro_batch_size": rec.get("micro_batch_size"),
                "accumulate_grad_batches": rec.get("accumulate_grad_batches"),
                "devices": rec.get("devices"),
                "lr": rec.get("lr"),
                "lr_source": rec.get("lr_source"),
                "unstable_lr": rec.get("unstable_lr"),
                "steps_done": rec.get("steps_done"),
                "tokens_seen": rec.get("tokens_seen"),
                "final_train_loss": rec.get("final_train_loss"),
                "final_val_loss": rec.get("final_val_loss"),
                "final_val_ppl": ppl,
                "wall_seconds": rec.get("wall_seconds"),
            }
        )
    return rows


def runs_table_markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| run | seed | status | batch | micro × accum × devices | peak LR | LR from | steps | tokens "
        "| final train loss | final val loss | val ppl | wall time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['experiment']} | {r['seed']} | {r['status']} | {r['batch_size']} "
        f"| {r['micro_batch_size']} × {r['accumulate_grad_batches']} × {r['devices']} "
        f"| {_num(r['lr'], '.4g')} | {_short_source(r['lr_source'])} | {r['steps_done']} "
        f"| {_num(r['tokens_seen'], ',')} | {_num(r['final_train_loss'])} "
        f"| {_num(r['final_val_loss'])} | {_num(r['final_val_ppl'], '.1f')} "
        f"| {_num(r['wall_seconds'], '.1f')} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def section_runs(study: Study, ctx: ReportContext) -> Section:
    rows = run_rows(study)
    md = runs_table_markdown(rows)
    md += (
        "\n\nFinal train loss: mean of the last 10 optimizer steps. Batch sizes are effective "
        "batches in sequences (micro batch × gradient accumulation × devices)."
    )
    if study.ignored:
        md += "\n\nNot compared: " + "; ".join(study.ignored) + "."
    return Section("runs", "Runs", md, rows)


def _seed_sentence(final: dict[str, Any], n_pairs: int, level: float) -> str:
    test = final.get("test")
    if test is None and not final.get("paired", True):
        return (
            "The two groups share no seed, so there is no paired test; run both with the same "
            "seeds (e.g. `-m seed=0,1,2`) to compare them against the seed-to-seed spread."
        )
    if test is None:
        return (
            "This rests on one seed: there is no estimate of the seed-to-seed spread, so the "
            "difference may be noise; run more seeds (e.g. `-m seed=0,1,2 experiment=...`) to test it."
        )
    lo, hi = test["interval"]
    verb = "is" if test["significant"] else "is not"
    return (
        f"Across {test['n_seeds']} paired seeds the final difference {verb} larger than the "
        f"seed-to-seed spread (paired t-test: mean {test['mean_difference']:+.4f}, "
        f"{level:.0%} interval [{lo:+.4f}, {hi:+.4f}], t = {_num(test['t'], '.2f')}, "
        f"p = {test['p_value']:.3g})."
    )


def verdict_for(study: Study, large: Group, s: CompareConfig) -> dict[str, Any]:
    """The verdict on the hypothesis for one large batch size against the small baseline."""
    small = study.small
    per_step = compare_view(small, large, "step", s)
    per_token = compare_view(small, large, "tokens", s)
    fs, ft = per_step.get("final", {}), per_token.get("final", {})
    verdict_step = supports(fs, len(per_step["paired_seeds"])) if fs else "no data"
    verdict_token = supports(ft, len(per_token["paired_seeds"])) if ft else "no data"
    name = "validation loss" if fs.get("metric") == "val_loss" else "smoothed training loss"
    lines = [
        f"**Large batch {large.batch_size} vs small batch {small.batch_size}** "
        f"(seeds {large.seeds} vs {small.seeds}).",
    ]
    if fs:
        adv = per_step["min_difference"]
        lead = (
            f"its largest lead is {-adv['difference']:.4f} nats ({-adv['relative']:.1%}) at step "
            f"{adv['step']:.0f}"
            if adv["difference"] < 0
            else "it is never lower"
        )
        lines.append(
            f"Per optimizer step: the large batch has the lower smoothed training loss at "
            f"{per_step['fraction_lower']:.0%} of the {per_step['points']} matched steps "
            f"(steps {_fmt_ranges(per_step['lower_ranges_small_steps'])}); {lead}. "
            f"At the final matched step {fs['at']:.0f} its {name} is {fs['large']:.4f} vs "
            f"{fs['small']:.4f}: {'lower' if fs['large_lower'] else 'higher'} by "
            f"{abs(fs['difference']):.4f} ({abs(fs['relative'] or 0):.1%})."
        )
        lines.append(_seed_sentence(fs, len(per_step["paired_seeds"]), s.confidence))
    if ft:
        ratio = large.runs[0].tokens_per_step / small.runs[0].tokens_per_step
        tname = "validation loss" if ft.get("metric") == "val_loss" else "smoothed training loss"
        lines.append(
            f"Per token seen (compute-fair; the large batch sees {ratio:g}× the tokens per step): "
            f"at equal tokens the large batch is lower at {per_token['fraction_lower']:.0%} of "
            f"the matched points; at {ft['at']:,.0f} tokens (the end of the shorter run) its "
            f"{tname} is {ft['large']:.4f} vs {ft['small']:.4f}: "
            f"{'lower' if ft['large_lower'] else 'higher'} by {abs(ft['difference']):.4f}, so "
            f"{'it holds per token too' if ft['large_lower'] else 'per token the small batch is ahead'}."
        )
        if ft.get("test"):
            lines.append(_seed_sentence(ft, len(per_token["paired_seeds"]), s.confidence))
    lines.append(
        f"Verdict: per step the hypothesis is **{verdict_step}**; per token it is "
        f"**{verdict_token}**."
    )
    return {
        "large_batch_size": large.batch_size,
        "small_batch_size": small.batch_size,
        "large_seeds": large.seeds,
        "small_seeds": small.seeds,
        "per_step_verdict": verdict_step,
        "per_token_verdict": verdict_token,
        "per_step": {k: v for k, v in per_step.items() if not _is_curve(k)},
        "per_token": {k: v for k, v in per_token.items() if not _is_curve(k)},
        "curves": {
            "per_step": {k: per_step[k] for k in per_step if _is_curve(k)},
            "per_token": {k: per_token[k] for k in per_token if _is_curve(k)},
        },
        "matched_steps": matched_points(small, large, s),
        "text": " ".join(lines),
    }


def _is_curve(key: str) -> bool:
    return key in ("grid", "difference_mean", "difference_lo", "difference_hi")


def section_verdict(study: Study, ctx: ReportContext) -> Section:
    s = ctx.settings
    comps = [verdict_for(study, g, s) for g in study.large]
    one_seed = all(len(g.runs) == 1 for g in study.groups)
    step_verdicts = {c["per_step_verdict"] for c in comps}
    overall = step_verdicts.pop() if len(step_verdicts) == 1 else "mixed"
    data = {
        "hypothesis": HYPOTHESIS,
        "overall_per_step": overall,
        "overall_per_token": (
            ({c["per_token_verdict"] for c in comps}.pop())
            if len({c["per_token_verdict"] for c in comps}) == 1
            else "mixed"
        ),
        "one_seed": one_seed,
        "metric_note": (
            "matched steps use the validation loss where both runs evaluated at that step, "
            f"else the training loss smoothed by a bias-corrected EMA (factor {s.ema})"
        ),
        "comparisons": comps,
    }
    md = [f"Hypothesis (the seed's): *{HYPOTHESIS}*.", ""]
    md += [c["text"] + "\n" for c in comps]
    md.append(f"_{data['metric_note']}._")
    for c in comps:
        md.append(
            f"\n**Matched steps, large batch {c['large_batch_size']} − small batch "
            f"{c['small_batch_size']}** (negative = the large batch is lower):\n"
        )
        md.append("| step | loss used | small | large | large − small | relative |")
        md.append("|---|---|---|---|---|---|")
        for r in c["matched_steps"]:
            md.append(
                f"| {r['step']} | {'val' if r['metric'] == 'val_loss' else 'smoothed train'} "
                f"| {r['small']:.4f} | {r['large']:.4f} | {r['difference']:+.4f} "
                f"| {_num(r['relative'], '+.1%')} |"
            )
    ctx.results["verdict"] = data
    return Section("verdict", "Verdict", "\n".join(md), data)


def section_curves(study: Study, ctx: ReportContext) -> Section:
    from batchsize_study import plots

    s = ctx.settings
    files = [
        ctx.save(plots.loss_vs(study, "step", s.confidence), "loss_vs_step.png"),
        ctx.save(plots.loss_vs(study, "tokens", s.confidence), "loss_vs_tokens.png"),
    ]
    comps = ctx.results.get("verdict", {}).get("comparisons") or [
        verdict_for(study, g, s) for g in study.large
    ]
    files.append(ctx.save(plots.difference(study, comps, s.confidence), "loss_difference.png"))
    curves = {
        g.label: {
            "seeds": g.seeds,
            "per_step": {k: v.tolist() for k, v in g.curve("step", s.confidence).items()},
            "per_token": {k: v.tolist() for k, v in g.curve("tokens", s.confidence).items()},
            "val_per_step": {k: v.tolist() for k, v in g.val_curve("step", s.confidence).items()},
            "val_per_token": {
                k: v.tolist() for k, v in g.val_curve("tokens", s.confidence).items()
            },
        }
        for g in study.groups
    }
    md = "\n\n".join(
        [
            "Smoothed training loss (lines; shaded: "
            f"{s.confidence:.0%} interval across seeds where there are several) and validation loss "
            "(markers), against optimizer steps (the seed's question) and against tokens seen "
            "(compute-fair).",
            "![loss vs step](loss_vs_step.png)",
            "![loss vs tokens](loss_vs_tokens.png)",
            "Difference large − small at matched steps and at matched tokens (below zero: the "
            "large batch is lower).",
            "![difference](loss_difference.png)",
        ]
    )
    return Section("curves", "Loss curves", md, curves, files)


def section_schedules(study: Study, ctx: ReportContext) -> Section:
    from batchsize_study import plots

    files = [ctx.save(plots.lr_schedules(study), "lr_schedules.png")]
    md = (
        "The learning rate of every run per optimizer step, with x (the measured unstable LR), "
        "y (small batch peak) and z (large batch peak) marked.\n\n![LR schedules](lr_schedules.png)"
    )
    lrs = lr_marks(study)
    if study.superconvergence:
        files.append(ctx.save(plots.superconvergence(study), "superconvergence.png"))
        md += (
            "\n\nThe superconvergence run: smoothed training loss against the learning rate "
            "(log scale) during the warmup, with the onset of the destabilisation (x) marked."
            "\n\n![superconvergence](superconvergence.png)"
        )
    return Section("schedules", "Learning rates", md, lrs, files)


def lr_marks(study: Study) -> dict[str, Any]:
    """x, y and z as the records state them (means over seeds)."""

    def mean(vals: list[Any]) -> float | None:
        v = [float(a) for a in vals if a is not None]
        return sum(v) / len(v) if v else None

    return {
        "x_unstable_lr": mean(
            [r.record.get("unstable_lr") for r in study.superconvergence]
            or [r.record.get("unstable_lr") for r in study.small.runs]
        ),
        "y_small_lr": mean([r.record.get("lr") for r in study.small.runs]),
        "z_large_lr": {
            g.batch_size: mean([r.record.get("lr") for r in g.runs]) for g in study.large
        },
    }


def section_diagnostics(study: Study, ctx: ReportContext) -> Section:
    diags = [diagnose(r, ctx.settings.overfit_tolerance) for r in study.runs]
    md_lines = []
    for r, d in zip(study.runs, diags):
        warn = r.record.get("instability_warning")
        if d["flag"]:
            md_lines.append(f"- **{r.run_id}: {d['flag']}** — {d['note']}.")
        if warn:
            md_lines.append(
                f"- **{r.run_id}**: the training loss rose at step {warn.get('onset_step')} "
                f"(LR {_num(warn.get('onset_lr'), '.4g')}): {warn.get('reason')}."
            )
    if not md_lines:
        md_lines.append(
            "No run shows overfitting (validation loss rising above its minimum by more than "
            f"{ctx.settings.overfit_tolerance:.0%} while the training loss falls) or a "
            "destabilisation."
        )
    return Section("diagnostics", "Overfitting or destabilisation", "\n".join(md_lines), diags)


def _external(key: str, title: str, result: tuple[str, dict[str, Any], list[str]]) -> Section:
    """Adapt a (markdown, data, PNG paths) section from another module (its own heading dropped)."""
    md, data, pngs = result
    lines = md.strip().splitlines()
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    return Section(key, title, "\n".join(lines).strip(), data, [Path(p).name for p in pngs])


def section_ladder(study: Study, ctx: ReportContext) -> Section:
    """Loss and steps-to-target against batch size, beside the gradient noise scale (issue: ladder)."""
    from batchsize_study.ladder import ladder_section

    return _external("ladder", "Batch-size ladder", ladder_section(study.dir, ctx.out_dir))


def section_probe(study: Study, ctx: ReportContext) -> Section:
    """Whether x is real: constant-LR probes at multiples of x, and Lightning's lr_find beside it."""
    from batchsize_study.probe import probe_section

    return _external(
        "stability_probe", "Is x real? (stability probe)", probe_section(study.dir, ctx.out_dir)
    )


for _b in (
    section_verdict,
    section_runs,
    section_curves,
    section_schedules,
    section_diagnostics,
    section_ladder,
    section_probe,
):
    register_section(_b)


# ---------------------------------------------------------------- entry point


def build_report(study_dir: str | Path, settings: CompareConfig | None = None) -> dict[str, Any]:
    """Load the study, run every section, write report/ (report.md, PNGs, comparison.json)."""
    s = settings or CompareConfig()
    study = load_study(study_dir, s.ema)
    out = study.dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # no stale plot from an earlier report
        old.unlink()
    ctx = ReportContext(out, s)
    sections = [sec for b in SECTIONS if (sec := b(study, ctx)) is not None]
    md = [f"# Batch size study: {study.dir.name}", "", f"Study folder: `{study.dir}`", ""]
    for sec in sections:
        md += [f"## {sec.title}", "", sec.markdown, ""]
    (out / "report.md").write_text("\n".join(md))
    comparison: dict[str, Any] = {
        "study_dir": str(study.dir),
        "settings": {f.name: getattr(s, f.name) for f in fields(s)},
        "plots": [p for sec in sections for p in sec.plots],
        "sections": [sec.key for sec in sections],
    }
    comparison.update({sec.key: sec.data for sec in sections})
    write_json_atomic(out / "comparison.json", _clean(comparison))
    return comparison


def _clean(obj: Any) -> Any:
    """JSON without NaN (not valid JSON): NaN and infinities become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def run_compare(settings: CompareConfig, study_dir: str | Path) -> dict[str, Any]:
    """``experiment=compare``: write ``<study.dir>/report/`` and log the verdict."""
    comparison = build_report(study_dir, settings)
    out = Path(comparison["study_dir"]) / REPORT_DIR
    for comp in comparison["verdict"]["comparisons"]:
        log.info("%s", comp["text"].replace("**", ""))
    log.info("report: %s (%d plots)", out / "report.md", len(comparison["plots"]))
    return comparison
