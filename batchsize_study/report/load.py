"""Loading a study for the report: records (batchsize_study.study) and curves (the one
metrics.csv reader, batchsize_study.metrics), grouped per (experiment, batch size), one run per
seed. Nothing here compares or writes."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchsize_study.errors import UserError
from batchsize_study.ladder import SMOOTHING, analyse_ladder, noise_scale_estimate, rung
from batchsize_study.metrics import METRICS, read_metrics
from batchsize_study.stats import ema, mean_interval
from batchsize_study.study import COMPARED, Selection, beside, run_name, select
from batchsize_study.study.stages import LARGE_BATCH, SMALL_BATCH

log = logging.getLogger("batchsize_study.report")


@dataclass
class Run:
    """One run's record and its curves (numpy arrays, one entry per optimizer step / val point)."""

    record: dict[str, Any]
    step: np.ndarray
    tokens: np.ndarray
    lr: np.ndarray
    train_loss: np.ndarray
    smoothed: np.ndarray
    """Training loss smoothed per optimizer step (EMA factor ``compare.ema``)."""
    smoothed_by_tokens: np.ndarray
    """Training loss smoothed over a window of tokens (:func:`token_window_beta`), for the
    per-token comparison; equal to ``smoothed`` until :meth:`smooth_by_tokens` sets it."""
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
        """Smoothed train loss interpolated at steps or tokens ``x`` (nan outside the run):
        smoothed per step along steps, over a fixed number of tokens along tokens."""
        if by == "step":
            return np.interp(x, self.step, self.smoothed, left=np.nan, right=np.nan)
        return np.interp(x, self.tokens, self.smoothed_by_tokens, left=np.nan, right=np.nan)

    def smooth_by_tokens(self, beta: float, ref_tokens_per_step: int) -> None:
        """Smooth over as many tokens as an EMA of factor ``beta`` spans at
        ``ref_tokens_per_step`` tokens per step."""
        b = token_window_beta(beta, self.tokens_per_step, ref_tokens_per_step)
        self.smoothed_by_tokens = ema(self.train_loss, b)

    def val_at(self, x: float, by: str) -> float | None:
        """Validation loss at exactly this step / token count, if the run evaluated there."""
        xs = self.val_step if by == "step" else self.val_tokens
        hit = np.nonzero(xs == x)[0]
        return float(self.val_loss[hit[-1]]) if len(hit) else None


def token_window_beta(beta: float, tokens_per_step: int, ref_tokens_per_step: int) -> float:
    """The per-step EMA factor whose window spans the same tokens as ``beta`` does at
    ``ref_tokens_per_step``: beta ** (tokens_per_step / ref_tokens_per_step).

    An EMA's weights decay as beta^k over k steps; a run with r times the tokens per step
    covers those tokens in k/r steps, so beta^r per step gives the same decay per token. Without
    it a large batch (4x the tokens per step) averages over 4x the tokens and, on a falling
    curve, lags behind the small batch when the two are compared per token."""
    return beta ** (tokens_per_step / ref_tokens_per_step)


def load_run(record: dict[str, Any], ema_beta: float) -> Run | None:
    """Read the run's metrics.csv (next to its result.json, so a moved study still reads)."""
    path = beside(record, METRICS)
    if not path.exists():
        log.warning("skipping %s: no metrics.csv", path.parent)
        return None
    c = read_metrics(path)
    if c.empty:
        log.warning("skipping %s: metrics.csv has no training rows", path.parent)
        return None
    smoothed = ema(c.train_loss, ema_beta)
    return Run(
        record=record,
        step=c.step,
        tokens=c.tokens,
        lr=c.lr,
        train_loss=c.train_loss,
        smoothed=smoothed,
        smoothed_by_tokens=smoothed,
        detector_smoothed=c.smoothed_loss,
        val_step=c.val_step,
        val_tokens=c.val_tokens,
        val_loss=c.val_loss,
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
    selection: Selection | None = None
    """The one selection these runs come from (batchsize_study.study.select)."""

    @property
    def groups(self) -> list[Group]:
        return [self.small, *self.large]


def first_command(sdir: Path) -> str:
    return (
        f"`python -m batchsize_study -m experiment=superconvergence,small_batch,large_batch "
        f"study.dir={sdir}`"
    )


def load_study(study_dir: str | Path, ema_beta: float = 0.9) -> Study:
    """The study's selection (batchsize_study.study.select: the latest completed run per
    (experiment, batch size, seed) of one configuration, each large run paired with the small
    run of its seed) with every selected run's curves, grouped per (experiment, batch size).

    Raises UserError (one line, what to run first) when there is nothing to compare."""
    sdir = Path(study_dir).expanduser().resolve()
    if not (sdir / "runs").is_dir():
        raise UserError(
            f"study.dir={sdir}: no study records there (no runs/ folder); run {first_command(sdir)} first"
        )
    sel = select(sdir)
    records = sel.records
    missing = [e for e, have in zip(COMPARED, (sel.small, sel.large)) if not have]
    if missing:
        found = ", ".join(f"{r['experiment']}:{r.get('status')}" for r in records) or "none"
        raise UserError(
            f"study.dir={sdir}: no completed {' or '.join(missing)} record (found: {found}); "
            f"run {first_command(sdir)} first"
        )
    ignored = list(sel.ignored)
    every = [*sel.small.values(), *(r for g in sel.large.values() for r in g.values())]
    loaded = {run_name(r): load_run(r, ema_beta) for r in every}
    for name, run in loaded.items():
        if run is None:
            ignored.append(f"{name}: no readable metrics.csv")

    def group(experiment: str, batch: int, recs: dict[int, dict[str, Any]]) -> Group | None:
        runs = [loaded[n] for r in recs.values() if (n := run_name(r)) in loaded and loaded[n]]
        return Group(experiment, batch, sorted(runs, key=lambda r: r.seed)) if runs else None  # type: ignore[arg-type,misc]

    # Seeds paired where any pair exists; groups that share no seed are compared unpaired
    # (Welch's test across seeds), which the verdict says.
    paired_small = {p.seed: p.small for p in sel.pairs} or sel.small
    small = group(SMALL_BATCH, sel.small_batch or 0, paired_small)
    large = [
        g
        for b in sorted(sel.large)
        if (
            g := group(
                LARGE_BATCH,
                b,
                {s: r for s, r in sel.large[b].items() if s in paired_small} or sel.large[b],
            )
        )
    ]
    if small is None or not large:
        raise UserError(
            f"study.dir={sdir}: the small_batch and large_batch records have no readable "
            f"metrics.csv; run {first_command(sdir)} first"
        )
    for item in ignored:
        log.warning("compare: not compared: %s", item)
    runs = [r for g in (small, *large) for r in g.runs]
    # Per token, every run is smoothed over the tokens the baseline's EMA spans.
    ref_tps = small.runs[0].tokens_per_step
    for run in runs:
        run.smooth_by_tokens(ema_beta, ref_tps)
    sc_runs = [run for r in sel.superconvergence if (run := load_run(r, ema_beta)) is not None]
    return Study(
        dir=sdir,
        records=records,
        runs=runs,
        small=small,
        large=large,
        superconvergence=sc_runs,
        ignored=ignored,
        selection=sel,
    )


def load_ladder(sel: Selection, target: float | None = None, level: float = 0.95) -> dict[str, Any]:
    """The study's batch-size ladder (batchsize_study.ladder) over the selection's rungs: each
    rung's training loss, smoothed by the one EMA and averaged over seeds, then its readings."""
    if not sel.rungs:
        return {"rungs": [], "note": "no completed small_batch/large_batch runs"}
    rungs = []
    for b in sorted(sel.rungs):
        recs = [sel.rungs[b][s] for s in sorted(sel.rungs[b])]
        # metrics.csv next to its result.json: a moved or copied study still reads.
        curves = [read_metrics(beside(r, METRICS)) for r in recs]
        curves = [c for c in curves if not c.empty]
        if not curves:
            continue
        n = min(len(c.step) for c in curves)
        steps = [int(s) for s in curves[0].step[:n]]
        smoothed = [ema(c.train_loss[:n], SMOOTHING) for c in curves]
        mean = [statistics.fmean(float(v[i]) for v in smoothed) for i in range(n)]
        rungs.append(rung(recs, steps, mean))
    budget = next(iter(next(iter(sel.rungs.values())).values())).get("max_steps")
    noise = noise_scale_estimate([r for g in sel.rungs.values() for r in g.values()], level)
    return analyse_ladder(rungs, (sel.key, budget), target, noise, level)
