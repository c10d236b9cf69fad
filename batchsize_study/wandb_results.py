"""The study's results in wandb: one run per result, beside the training runs of the study.

``experiment=compare``, ``experiment=evaluate`` and the ``lr_sweep`` summary each log one wandb
run in the study's ``group`` (``study.name``, the group the training runs use) with their numbers
as summary keys, so the dashboard holds the answer, not only the curves. Nothing is logged when
the logger config has wandb off (``logger=csv``) or ``WANDB_MODE=disabled``; the mode is resolved
as for training (offline by default, never waiting on a network; ``WANDB_MODE`` wins) and wandb's
service is torn down after the run, so no process is left. A failure to log warns and never fails
the report or the record, which are already written.

The wandb run id is deterministic (:func:`batchsize_study.wandb_utils.wandb_run_id` of the study
folder and a key), opened with ``resume="allow"``: running compare again updates the study's one
compare run (offline: a new ``offline-run-<time>-<id>`` folder of the same id) instead of adding
another. Keys: ``compare-<study.name>``; the evaluate record's run id (one wandb run per
evaluation); the sweep summary record's run id (one per batch size and seed set).

Summary keys (``<B>`` a large batch size, ``<b>`` any batch size; a key whose value the result
lacks is left out, never written as null):

Compare run (job_type ``compare``), from ``report/comparison.json``:

* ``verdict/per_step``, ``verdict/per_token``: the overall verdicts on the hypothesis (supported,
  not supported, mixed across large batches, ...); ``verdict/one_seed``.
* ``verdict/bs<B>/per_step``, ``verdict/bs<B>/per_token``: the verdicts of large batch ``<B>``
  against the small batch (``verdict/bs<B>/small_batch_size``), with ``verdict/bs<B>/one_seed``,
  ``verdict/bs<B>/paired_seeds``.
* ``verdict/bs<B>/step/...`` (matched optimizer steps) and ``verdict/bs<B>/token/...`` (matched
  tokens seen): ``final_difference`` (large - small at the final matched point, nats),
  ``final_relative``, ``final_at`` (that step / token count), ``final_metric`` (val_loss or
  smoothed_train_loss), ``final_small``, ``final_large``, ``interval_low`` / ``interval_high``
  and ``p_value`` (the t-test across seeds; two or more seeds only), ``val_se`` (the validation
  set's standard error of the difference) and ``val_se_exceeds``, ``fraction_lower`` (of the
  matched points where the large batch is lower).
* ``test/...``: the test-set difference as in the evaluate run below, plus
  ``test/of_compared_runs`` (the evaluation scored the compared runs).
* ``lr_x_unstable``, ``lr_y_small``, ``lr_z_large`` (x, y, z: the same names as the training
  runs' summaries; ``lr_z_large`` of the smallest large batch) and ``lr_z_large/bs<B>``.
* ``lr_sweep/bs<b>/...``: each swept batch's ``best_lr``, ``best_loss``, ``best_se``,
  ``cliff_lr``, ``cliff_upper_lr``, ``best_at_grid_edge``, ``cliff_at_grid_edge``, ``n_points``,
  ``noise_method``, ``unstable_lr``; ``lr_sweep/checks/<name>`` (the report's acceptance checks).
* ``noise/B_simple`` (the gradient noise scale estimate, sequences), ``noise/interval_low``,
  ``noise/interval_high``, ``noise/level``, ``noise/n_seeds``, ``noise/method``,
  ``noise/seed<s>``; ``noise/bs<b>/gradient_noise_scale`` and ``noise/bs<b>/regime`` (below,
  near, above or uncertain) per rung; ``noise/critical_batch`` (the ladder fit's B_crit) with
  ``noise/critical_batch_low`` / ``_high``.
* ``report/dir``: the report folder.
* Media (one history row): ``figures/<name>`` a ``wandb.Image`` of each report PNG;
  ``tables/matched_steps`` (large_batch_size, step, metric, small, large, difference, relative),
  ``tables/difference_curves`` (large_batch_size, axis, x, difference_mean, difference_lo,
  difference_hi), ``tables/lr_sensitivity`` (batch_size, lr, n, mean, se, diverged,
  within_noise, best, cliff) and ``tables/lr_sweep_points`` (batch_size, lr, seed, final_loss,
  loss_kind, diverged, run_id).

Evaluate run (job_type ``evaluate``), from the evaluate record:

* ``test/difference`` (pooled mean large - small test loss, nats), ``test/interval_low``,
  ``test/interval_high`` (the wider of the window and block bootstrap intervals, which the
  verdict reads), ``test/interval_from`` (windows or blocks), ``test/level``,
  ``test/large_lower``, ``test/large_higher``, ``test/small_batch_size``,
  ``test/large_batch_size``, ``test/n_seeds``, ``test/across_seeds/interval_low`` / ``_high`` /
  ``p_value`` (two or more seeds): of the first comparison (the smallest large batch); the same
  under ``test/bs<B>/...`` for every large batch.
* ``test/model/<experiment>-bs<b>-seed<s>/loss``, ``.../loss_se``, ``.../ppl``;
  ``test/windows``, ``test/max_loss_se``, ``test/split_too_small``.
* ``tables/test_models`` (run_id, experiment, batch_size, seed, lr, final_val_loss, test_loss,
  test_loss_se, test_ppl).

LR sweep summary run (job_type ``lr_sweep_summary``), from the summary record:

* ``lr_sweep/bs<b>/...`` as in the compare run, plus ``best_over_x`` and ``cliff_over_x``; ``lr_x_unstable``; ``tables/lr_sensitivity`` and ``tables/lr_sweep_points``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from batchsize_study.config import Config, LoggerConfig
from batchsize_study.stats import json_safe

log = logging.getLogger("batchsize_study")

Summary = dict[str, float | int | str | bool]
Media = Callable[[Any], dict[str, Any]]
"""wandb module -> {key: wandb.Image | wandb.Table}: built only once wandb is imported."""

_FINAL_KEYS = ("difference", "relative", "at", "metric", "small", "large")
_SWEEP_KEYS = (
    "best_lr",
    "best_loss",
    "best_se",
    "cliff_lr",
    "cliff_upper_lr",
    "best_at_grid_edge",
    "cliff_at_grid_edge",
    "n_points",
    "noise_method",
    "unstable_lr",
    "best_over_x",
    "cliff_over_x",
)


# ---------------------------------------------------------------- summary keys (pure)


def _put(out: Summary, key: str, value: Any) -> None:
    """A scalar summary value; None (and NaN, via json_safe) is left out."""
    if isinstance(value, (bool, int, float, str)):
        out[key] = value


def _interval(out: Summary, prefix: str, iv: Any) -> None:
    if isinstance(iv, (list, tuple)) and len(iv) == 2:
        _put(out, f"{prefix}interval_low", iv[0])
        _put(out, f"{prefix}interval_high", iv[1])


def verdict_summary(verdict: Mapping[str, Any]) -> Summary:
    """``verdict/...`` keys of comparison.json's ``verdict`` section."""
    out: Summary = {}
    _put(out, "verdict/per_step", verdict.get("overall_per_step"))
    _put(out, "verdict/per_token", verdict.get("overall_per_token"))
    _put(out, "verdict/one_seed", verdict.get("one_seed"))
    for comp in verdict.get("comparisons") or []:
        p = f"verdict/bs{comp.get('large_batch_size')}/"
        _put(out, p + "per_step", comp.get("per_step_verdict"))
        _put(out, p + "per_token", comp.get("per_token_verdict"))
        for k in ("small_batch_size", "paired_seeds", "one_seed"):
            _put(out, p + k, comp.get(k))
        for axis, view in (("step", comp.get("per_step")), ("token", comp.get("per_token"))):
            view = view or {}
            q = f"{p}{axis}/"
            _put(out, q + "fraction_lower", view.get("fraction_lower"))
            final = view.get("final") or {}
            for k in _FINAL_KEYS:
                _put(out, f"{q}final_{k}", final.get(k))
            test = final.get("test") or {}
            _interval(out, q, test.get("interval"))
            _put(out, q + "p_value", test.get("p_value"))
            val_se = final.get("val_se") or {}
            _put(out, q + "val_se", val_se.get("difference"))
            _put(out, q + "val_se_exceeds", val_se.get("exceeds"))
    return out


def _test_comparison(out: Summary, p: str, cmp: Mapping[str, Any], level: Any) -> None:
    _put(out, p + "difference", cmp.get("mean_difference"))
    _interval(out, p, cmp.get("interval"))
    for k in ("interval_from", "large_lower", "large_higher"):
        _put(out, p + k, cmp.get(k))
    _put(out, p + "level", level)
    _put(out, p + "small_batch_size", cmp.get("small_batch_size"))
    _put(out, p + "large_batch_size", cmp.get("large_batch_size"))
    _put(out, p + "n_seeds", len(cmp.get("seeds") or []))
    seeds = cmp.get("across_seeds") or {}
    _interval(out, p + "across_seeds/", seeds.get("interval"))
    _put(out, p + "across_seeds/p_value", seeds.get("p_value"))


def testset_summary(rec: Mapping[str, Any]) -> Summary:
    """``test/...`` keys of an evaluate record (or comparison.json's ``evaluation`` section)."""
    out: Summary = {}
    comps = sorted(rec.get("comparisons") or [], key=lambda d: d.get("large_batch_size") or 0)
    level = (rec.get("evaluate") or {}).get("confidence")
    for i, cmp in enumerate(comps):
        if i == 0:
            _test_comparison(out, "test/", cmp, level)
        _test_comparison(out, f"test/bs{cmp.get('large_batch_size')}/", cmp, level)
    for m in rec.get("models") or []:
        p = f"test/model/{m.get('experiment')}-bs{m.get('batch_size')}-seed{m.get('seed')}/"
        _put(out, p + "loss", m.get("test_loss"))
        _put(out, p + "loss_se", m.get("test_loss_se"))
        _put(out, p + "ppl", m.get("test_ppl"))
    _put(out, "test/windows", (rec.get("test_split") or {}).get("windows"))
    _put(out, "test/max_loss_se", rec.get("max_test_loss_se"))
    _put(out, "test/split_too_small", rec.get("test_split_too_small"))
    return out


def sweep_summary(bs: Any, sweep: Mapping[str, Any]) -> Summary:
    """``lr_sweep/bs<b>/...`` keys of one batch size's sweep analysis (lr_sensitivity.summarise
    plus the record's fields)."""
    out: Summary = {}
    for k in _SWEEP_KEYS:
        _put(out, f"lr_sweep/bs{bs}/{k}", sweep.get(k))
    return out


def noise_summary(ladder: Mapping[str, Any]) -> Summary:
    """``noise/...`` keys of comparison.json's ``ladder`` section."""
    out: Summary = {}
    est = ladder.get("noise_scale") or {}
    _put(out, "noise/B_simple", est.get("value"))
    _interval(out, "noise/", est.get("interval"))
    for k in ("level", "n_seeds", "method"):
        _put(out, f"noise/{k}", est.get(k))
    for seed, v in (est.get("per_seed") or {}).items():
        _put(out, f"noise/seed{seed}", v)
    for r in ladder.get("rungs") or []:
        _put(
            out,
            f"noise/bs{r.get('batch_size')}/gradient_noise_scale",
            r.get("gradient_noise_scale"),
        )
        _put(out, f"noise/bs{r.get('batch_size')}/regime", r.get("noise_regime"))
    _put(out, "noise/critical_batch", ladder.get("empirical_critical_batch"))
    fit = ladder.get("fit") or {}
    _put(out, "noise/critical_batch_low", fit.get("b_crit_lo"))
    _put(out, "noise/critical_batch_high", fit.get("b_crit_hi"))
    return out


def xyz_summary(marks: Mapping[str, Any]) -> Summary:
    """x, y, z under the training runs' summary names (wandb_utils.lr_xyz)."""
    out: Summary = {}
    _put(out, "lr_x_unstable", marks.get("x_unstable_lr"))
    _put(out, "lr_y_small", marks.get("y_small_lr"))
    z = marks.get("z_large_lr") or {}
    if isinstance(z, Mapping):
        for i, (bs, lr) in enumerate(sorted(z.items(), key=lambda kv: int(kv[0]))):
            if i == 0:
                _put(out, "lr_z_large", lr)
            _put(out, f"lr_z_large/bs{bs}", lr)
    else:
        _put(out, "lr_z_large", z)
    return out


def comparison_summary(comparison: Mapping[str, Any]) -> Summary:
    """Every summary key of the compare run (module docstring), from build_report's dict."""
    c = json_safe(dict(comparison))
    out: Summary = {}
    out.update(verdict_summary(c.get("verdict") or {}))
    ev = c.get("evaluation") or {}
    if ev.get("comparisons"):
        out.update(testset_summary(ev))
        _put(out, "test/of_compared_runs", ev.get("of_compared_runs"))
    out.update(xyz_summary(c.get("schedules") or {}))
    sens = c.get("lr_sensitivity") or {}
    for bs, sw in (sens.get("batches") or {}).items():
        out.update(sweep_summary(bs, sw))
    for k, v in (sens.get("checks") or {}).items():
        _put(out, f"lr_sweep/checks/{k}", v)
    out.update(noise_summary(c.get("ladder") or {}))
    if c.get("study_dir"):
        out["report/dir"] = str(Path(c["study_dir"]) / "report")
    return out


def evaluate_summary(rec: Mapping[str, Any]) -> Summary:
    """Every summary key of the evaluate run."""
    return testset_summary(json_safe(dict(rec)))


def lr_sweep_summary(rec: Mapping[str, Any]) -> Summary:
    """Every summary key of the lr_sweep_summary run."""
    r = json_safe(dict(rec))
    out = sweep_summary(r.get("batch_size"), r)
    _put(out, "lr_x_unstable", r.get("unstable_lr"))
    return out


# ---------------------------------------------------------------- tables (rows, pure)


def matched_step_rows(verdict: Mapping[str, Any]) -> list[list[Any]]:
    """Rows of ``tables/matched_steps``."""
    return [
        [c.get("large_batch_size"), *(r.get(k) for k in MATCHED_COLUMNS[1:])]
        for c in verdict.get("comparisons") or []
        for r in c.get("matched_steps") or []
    ]


MATCHED_COLUMNS = ["large_batch_size", "step", "metric", "small", "large", "difference", "relative"]
CURVE_COLUMNS = [
    "large_batch_size",
    "axis",
    "x",
    "difference_mean",
    "difference_lo",
    "difference_hi",
]
SENSITIVITY_COLUMNS = ["batch_size", "lr", "n", "mean", "se", "diverged", "within_noise"]
SENSITIVITY_COLUMNS += ["best", "cliff"]
POINT_COLUMNS = ["batch_size", "lr", "seed", "final_loss", "loss_kind", "diverged", "run_id"]
MODEL_COLUMNS = ["run_id", "experiment", "batch_size", "seed", "lr", "final_val_loss"]
MODEL_COLUMNS += ["test_loss", "test_loss_se", "test_ppl"]


def curve_rows(verdict: Mapping[str, Any]) -> list[list[Any]]:
    """Rows of ``tables/difference_curves``: large - small along steps and along tokens."""
    rows = []
    for c in verdict.get("comparisons") or []:
        for axis, curve in (c.get("curves") or {}).items():
            grid = curve.get("grid") or []
            cols = [curve.get(k) or [None] * len(grid) for k in CURVE_COLUMNS[3:]]
            rows += [[c.get("large_batch_size"), axis, x, *v] for x, *v in zip(grid, *cols)]
    return rows


def sensitivity_rows(batches: Mapping[Any, Mapping[str, Any]]) -> list[list[Any]]:
    """Rows of ``tables/lr_sensitivity``: per batch size and LR, the mean final loss ± se."""
    rows = []
    for bs, s in batches.items():
        for r in s.get("per_lr") or []:
            rows.append(
                [int(bs), *(r.get(k) for k in SENSITIVITY_COLUMNS[1:7])]
                + [r.get("lr") == s.get("best_lr"), r.get("lr") == s.get("cliff_lr")]
            )
    return rows


def point_rows(batches: Mapping[Any, Mapping[str, Any]]) -> list[list[Any]]:
    """Rows of ``tables/lr_sweep_points``: one per sweep run."""
    return [
        [int(bs), *(p.get(k) for k in POINT_COLUMNS[1:])]
        for bs, s in batches.items()
        for p in s.get("points") or []
    ]


def _tables(wandb: Any, tables: Mapping[str, tuple[list[str], list[list[Any]]]]) -> dict:
    return {
        f"tables/{name}": wandb.Table(columns=cols, data=rows)
        for name, (cols, rows) in tables.items()
        if rows
    }


def _sweep_tables(batches: Mapping[Any, Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "lr_sensitivity": (SENSITIVITY_COLUMNS, sensitivity_rows(batches)),
        "lr_sweep_points": (POINT_COLUMNS, point_rows(batches)),
    }


# ---------------------------------------------------------------- the wandb run


def log_result_run(
    cfg: LoggerConfig,
    study_dir: str | os.PathLike[str],
    group: str,
    job_type: str,
    key: str,
    summary: Summary,
    media: Media | None = None,
    config: dict[str, Any] | None = None,
) -> str | None:
    """Log one result run (id from the study folder and ``key``) and finish it: its wandb id, or
    None when wandb is off or logging failed (a warning; the result on disk is unaffected)."""
    if not cfg.wandb or not _rank_zero():
        return None
    from batchsize_study import wandb_utils as wu

    mode = wu.resolve_wandb_mode(cfg.wandb_mode)
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: the %s results are not logged to wandb", job_type)
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    run = None
    try:
        wandb_dir = Path(study_dir) / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        wid = wu.wandb_run_id(study_dir, key)
        wu._avoid_folder_clash(wandb_dir, wid)
        run = _start(wandb, wu, cfg, mode, job_type, key, wid, str(study_dir), group, config)
        if run is None:
            return None
        if media is not None:
            items = media(wandb)
            if items:
                run.log(items)
        run.summary.update(summary)
        wid = run.id
        log.info("wandb: %s results in run %s (group %s)", job_type, wid, group)
        return wid
    except Exception as exc:  # the report / record is written: wandb must not fail it
        log.warning("wandb: could not log the %s results: %s", job_type, exc)
        return None
    finally:
        if run is not None:
            try:
                run.finish()
            except Exception as exc:
                log.warning("wandb.finish failed: %s", exc)
        wu.teardown()  # as training does: no wandb service left running


def _rank_zero() -> bool:
    """Not a rank > 0 of a distributed launch (each rank of a DDP sweep writes the summary):
    the environment variables Lightning's rank_zero_only reads, first set wins."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var) is not None:
            return os.environ[var].strip() in ("", "0")
    return True


def _start(
    wandb: Any,
    wu: Any,
    cfg: LoggerConfig,
    mode: str,
    job_type: str,
    name: str,
    wid: str,
    study_dir: str,
    group: str,
    config: dict[str, Any] | None,
) -> Any:
    """wandb.init as training's logger does it: an online start that fails within
    ``wandb_init_timeout`` falls back to offline; None (a warning) if wandb cannot start."""
    kwargs = dict(
        **wu.run_identity(cfg, group, job_type, name, wid), dir=study_dir, config=config or {}
    )
    settings = wu.init_settings(wandb, cfg)
    try:
        return wandb.init(mode=mode, settings=settings, **kwargs)
    except Exception as exc:  # wandb raises its own error types on a failed init
        wu.teardown()
        if mode != "online":
            log.warning("wandb could not start (%s): %s results not logged", exc, job_type)
            return None
        log.warning(
            "wandb online could not start within %ss (%s): logging the %s results offline",
            cfg.wandb_init_timeout,
            type(exc).__name__,
            job_type,
        )
    try:
        settings = wandb.Settings(console="off", silent=True, mode="offline")
        return wandb.init(mode="offline", settings=settings, **kwargs)
    except Exception as exc:
        wu.teardown()
        log.warning("wandb offline could not start either (%s): %s not logged", exc, job_type)
        return None


# ---------------------------------------------------------------- entry points


def log_compare(c: Config, comparison: Mapping[str, Any]) -> str | None:
    """``experiment=compare``: the report's numbers, figures and tables as the study's one
    compare run (job_type compare, id from the study folder and group)."""
    if not c.logger.wandb:
        return None
    try:
        summary = comparison_summary(comparison)
        sdir = str(comparison["study_dir"])
        report = Path(sdir) / "report"
        verdict = comparison.get("verdict") or {}
        batches = (comparison.get("lr_sensitivity") or {}).get("batches") or {}

        def media(wandb: Any) -> dict[str, Any]:
            out = {
                f"figures/{Path(p).stem}": wandb.Image(str(report / p))
                for p in comparison.get("plots") or []
                if (report / p).is_file()
            }
            tables = {
                "matched_steps": (MATCHED_COLUMNS, matched_step_rows(verdict)),
                "difference_curves": (CURVE_COLUMNS, curve_rows(verdict)),
                **_sweep_tables(batches),
            }
            return out | _tables(wandb, json_safe(tables))

        config = {
            "study": {"name": c.study.name, "dir": sdir},
            "compare": json_safe(dict(comparison.get("settings") or {})),
        }
    except Exception as exc:
        log.warning("wandb: could not read the comparison for wandb: %s", exc)
        return None
    return log_result_run(
        c.logger, sdir, c.study.name, "compare", f"compare-{c.study.name}", summary, media, config
    )


def log_evaluate(c: Config, record: Mapping[str, Any], study_dir: str) -> str | None:
    """``experiment=evaluate``: the test-set numbers as a run of job_type evaluate."""
    if not c.logger.wandb:
        return None
    try:
        summary = evaluate_summary(record)
        rows = [[m.get(k) for k in MODEL_COLUMNS] for m in record.get("models") or []]

        def media(wandb: Any) -> dict[str, Any]:
            return _tables(wandb, {"test_models": (MODEL_COLUMNS, json_safe(rows))})

        config = {"study": {"name": c.study.name, "dir": study_dir}}
        config["evaluate"] = json_safe(dict(record.get("evaluate") or {}))
        key = str(record["run_id"])
    except Exception as exc:
        log.warning("wandb: could not read the evaluate record for wandb: %s", exc)
        return None
    return log_result_run(
        c.logger, study_dir, c.study.name, "evaluate", key, summary, media, config
    )


def log_lr_sweep(c: Config, record: Mapping[str, Any], study_dir: str) -> str | None:
    """The lr_sweep summary record as a run of job_type lr_sweep_summary."""
    if not c.logger.wandb:
        return None
    try:
        summary = lr_sweep_summary(record)
        batches = {record["batch_size"]: record}

        def media(wandb: Any) -> dict[str, Any]:
            return _tables(wandb, json_safe(_sweep_tables(batches)))

        config = {"study": {"name": c.study.name, "dir": study_dir}}
        config["sweep"] = json_safe(dict(record.get("sweep") or {}))
        config["batch_size"] = record.get("batch_size")
        config["seeds"] = json_safe(record.get("seeds"))
        key = str(record["run_id"])
    except Exception as exc:
        log.warning("wandb: could not read the lr sweep summary for wandb: %s", exc)
        return None
    return log_result_run(
        c.logger, study_dir, c.study.name, "lr_sweep_summary", key, summary, media, config
    )
