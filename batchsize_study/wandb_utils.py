"""wandb: offline by default, never waiting on a network, never leaving a process behind.

Runs of one study share a ``group``; each experiment is a ``job_type``. Offline runs are written
to ``<study.dir>/wandb/offline-run-<date>_<time>-<id>/`` (the metrics, config and summary are in
its ``run-<id>.wandb`` file) and uploaded later with ``wandb sync <study.dir>/wandb/offline-run-*``.

The mode: ``logger.wandb_mode`` (offline by default, ``logger=wandb_online`` online) unless
``WANDB_MODE`` is set in the environment, which wins (:func:`resolve_wandb_mode`).

One wandb run per training run, across crashes: the wandb run id derives from the study folder
and the package's run id (:func:`wandb_run_id`), and every process of the run opens it with
``resume="allow"``. wandb cannot resume an offline run, so each process writes its own folder
``offline-run-<time>-<id>``; together they hold every optimizer step once. A resumed process
reads what the earlier folders of its id hold (their ``.wandb`` files), logs what metrics.csv has
and they lack (the last steps before a ``kill -9``, which never left the process) before training
goes on, and drops the rows they already hold (steps trained again after the checkpoint). Rows
are logged with ``step=`` the optimizer step, so wandb's ``_step`` is the global step in every
folder, the folders' steps are disjoint, and the validation row of a step joins that step's
training row. Upload the folders of one id oldest first (``wandb sync`` takes them in name order,
which is time order); whether the server appends a later folder or replaces the run's history
with it is wandb's, not this package's, behaviour.

The x-axis: every metric keeps ``trainer/global_step`` as its default x-axis (Lightning's
``define_metric("*", step_metric="trainer/global_step")``). ``tokens_seen`` and ``train/lr`` are
declared metrics and are in every logged row (validation rows too), which is what wandb needs to
draw any loss against them: pick ``tokens_seen`` as the panel's x-axis for loss vs tokens. Giving
the loss keys ``step_metric="tokens_seen"`` instead would make tokens the default axis of every
panel; the step stays the default.

The study's results (``experiment=compare``, ``experiment=evaluate``, the lr_sweep summary) are
wandb runs of the same group too: :mod:`batchsize_study.wandb_results`, whose docstring lists
their summary keys. They need this module's mode and id rules but not Lightning, which is
imported only when a training logger is built (:func:`study_logger_class`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
import os
import re
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from batchsize_study.config import LoggerConfig
from batchsize_study.metrics import METRICS
from batchsize_study.study.stages import LARGE_BATCH, SMALL_BATCH

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"
"""In the run folder: the wandb run id its processes log to (written when one first logs)."""
WANDB_ID_MAX = 64
_ENV_MODES = {
    "offline": "offline",
    "dryrun": "offline",
    "online": "online",
    "run": "online",
    "disabled": "disabled",
}
_VALID_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_RUN_FOLDER = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(?P<id>.+)$")
_TRAIN_KEYS = (  # metrics.csv column -> the key live logging uses (recorder.StepRecorder.flush)
    ("train_loss", "train/loss"),
    ("lr", "train/lr"),
    ("grad_norm", "train/grad_norm"),
    ("tokens_per_second", "throughput/tokens_per_second"),
    ("mfu", "throughput/mfu"),
    ("smoothed_loss", "spike/smoothed_loss"),
)
_VAL_KEYS = (("val_loss", "val/loss"), ("val_ppl", "val/ppl"), ("val_loss_se", "val/loss_se"))


def run_identity(
    cfg: LoggerConfig, group: str, job_type: str, name: str, wid: str
) -> dict[str, Any]:
    """The wandb.init arguments every run of the package shares (training and results): where
    it goes, which run it is, and that the same id continues it."""
    return dict(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity,
        group=group,
        job_type=job_type,
        name=name,
        id=wid,
        resume="allow",
        reinit="finish_previous",
    )


def init_settings(wandb: Any, cfg: LoggerConfig) -> Any:
    """wandb.Settings of every run: a bounded online start, no console capture, silent."""
    return wandb.Settings(init_timeout=cfg.wandb_init_timeout, console="off", silent=True)


def make_wandb_logger(
    cfg: LoggerConfig,
    study_dir: str,
    group: str,
    job_type: str,
    run_id: str,
    config: dict[str, Any],
    *,
    run_dir: str | os.PathLike[str] | None = None,
    resume_step: int = 0,
    tokens_per_step: int | None = None,
    force: bool = False,
) -> _StudyLogger | None:
    """A WandbLogger, or None when wandb is off. An online run that cannot reach the server within
    ``wandb_init_timeout`` falls back to offline with a warning; training goes on.

    ``run_dir`` (the run's folder, with its metrics.csv) and ``resume_step`` (the checkpoint step
    training resumes from) let a resumed process continue its run's wandb run and first log the
    rows wandb lacks; ``force`` (start over) opens a new wandb run where the old one has rows."""
    if not cfg.wandb:
        return None
    mode = resolve_wandb_mode(cfg.wandb_mode)
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: logging to metrics.csv only")
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    # wandb writes into <dir>/wandb/: giving it the study folder puts each offline run at
    # <study.dir>/wandb/offline-run-<time>-<id>/ (not <study.dir>/wandb/wandb/...).
    save_dir = study_dir
    wandb_dir = Path(save_dir) / "wandb"
    os.makedirs(wandb_dir, exist_ok=True)
    wid = choose_wandb_run_id(study_dir, run_id, run_dir, wandb_dir, force)
    _avoid_folder_clash(wandb_dir, wid)
    settings = init_settings(wandb, cfg)
    common = dict(
        **run_identity(cfg, group, job_type, run_id, wid),
        save_dir=save_dir,
        config=config,
        tokens_per_step=tokens_per_step,
        id_file=Path(run_dir) / WANDB_ID_FILE if run_dir is not None else None,
    )
    # offline=False always: Lightning's offline=True sets os.environ["WANDB_MODE"] for the whole
    # process, which would then read as the user's choice. The mode goes to wandb.init instead.
    lg = study_logger_class()(offline=False, mode=mode, settings=settings, **common)
    try:
        run = lg.experiment  # starts the run now, so a network failure shows here, not mid-training
    except Exception as exc:  # wandb raises its own error types on a failed init
        if mode != "online":
            log.warning(
                "wandb could not start (%s): logging to metrics.csv only", type(exc).__name__
            )
            teardown()
            return None
        log.warning(
            "wandb online could not start within %ss (%s): falling back to offline",
            cfg.wandb_init_timeout,
            type(exc).__name__,
        )
        teardown()  # the failed online attempt leaves wandb's service in a state offline trips on
        try:
            # A fresh Settings: wandb fills the one it was given with the online attempt's values.
            settings = wandb.Settings(console="off", silent=True, mode="offline")
            lg = study_logger_class()(offline=False, mode="offline", settings=settings, **common)
            run = lg.experiment
        except Exception as exc2:
            log.warning(
                "wandb offline could not start either (%s): logging to metrics.csv only",
                type(exc2).__name__,
            )
            teardown()
            return None
    try:
        lg.continue_run(run, Path(run_dir) / METRICS if run_dir is not None else None, resume_step)
    except Exception as exc:  # the dashboard's history must never stop training
        log.warning("wandb: could not bring the run's earlier history up to date: %s", exc)
    return lg


@functools.cache
def study_logger_class() -> type[Any]:
    """``StudyWandbLogger``: :class:`_StudyLogger` on Lightning's WandbLogger, built on first use
    so that importing this module costs no Lightning import (~5 s on 2 cores): the study's
    results (wandb_results.py, experiment=compare) need only wandb."""
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    cls = type(
        "StudyWandbLogger",
        (_StudyLogger, WandbLogger),
        {"log_metrics": rank_zero_only(_StudyLogger.log_metrics), "__module__": __name__},
    )
    return cls


def __getattr__(name: str) -> Any:
    """``wandb_utils.StudyWandbLogger`` (also how pickle finds the class) loads Lightning now."""
    if name == "StudyWandbLogger":
        return study_logger_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _StudyLogger:
    """Lightning's WandbLogger (the base :func:`study_logger_class` adds), logging each row at
    its optimizer step (``step=``, so wandb's ``_step`` is the global step in every process of
    the run) with ``tokens_seen`` in it, and dropping the rows an earlier process of the same
    run already gave wandb."""

    experiment: Any  # WandbLogger's

    def __init__(
        self,
        *args: Any,
        tokens_per_step: int | None = None,
        id_file: Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_per_step = tokens_per_step
        self.id_file = id_file
        self.have: set[tuple[str, int]] = set()
        """(kind, step) rows the run's earlier offline folders hold."""
        self.floor = 0
        """Online, resumed: the server's next step; rows below it are there (or refused)."""
        self._lr: tuple[int, float] | None = None
        self._id_written = False

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """One row at ``step``; validation rows get the step's tokens_seen and LR too (rank 0
        only: :func:`study_logger_class` wraps it in ``rank_zero_only``)."""
        if step is None:
            super().log_metrics(metrics, step)  # type: ignore[misc]
            return
        step = int(step)
        kind = row_kind(metrics)
        if step < self.floor or (kind is not None and (kind, step) in self.have):
            return
        row = dict(metrics)
        if "train/lr" in row:
            self._lr = (step, row["train/lr"])
        elif self._lr is not None and self._lr[0] == step:
            row.setdefault("train/lr", self._lr[1])
        if self.tokens_per_step:
            row.setdefault("tokens_seen", step * self.tokens_per_step)
        row["trainer/global_step"] = step
        self.experiment.log(row, step=step)
        if not self._id_written:
            self._id_written = True
            self._write_id()

    def continue_run(self, run: Any, metrics_csv: Path | None, resume_step: int) -> None:
        """Before training: declare the metrics; learn what earlier processes of this run gave
        wandb; log the rows of metrics.csv up to ``resume_step`` that wandb lacks."""
        if not _is_live_run(run):
            return  # a rank > 0, or a disabled run
        try:
            for name, summary in (
                ("train/loss", "last"),
                ("val/loss", "min"),
                ("tokens_seen", "max"),
                ("train/lr", "last"),
            ):  # the step stays every metric's default x-axis (see the module docstring)
                run.define_metric(name, step_metric="trainer/global_step", summary=summary)
        except Exception:  # older wandb
            pass
        if run.offline:
            current = Path(run.settings.sync_dir).resolve()
            for folder in run_folders(current.parent, run.id):
                if folder.resolve() != current:
                    self.have |= logged_rows(folder)
        else:
            self.floor = int(run.starting_step or 0)
        if metrics_csv is None or resume_step <= 0 or not metrics_csv.exists():
            return
        logged = 0
        for step, metrics in csv_rows(metrics_csv, resume_step):
            kind = row_kind(metrics)
            if step >= self.floor and (kind, step) not in self.have:
                self.log_metrics(metrics, step)
                logged += 1
        if logged:
            log.info(
                "wandb run %s: logged %d rows of metrics.csv it lacked (steps up to %d)",
                run.id,
                logged,
                resume_step,
            )

    def _write_id(self) -> None:
        """The run folder remembers its wandb run (a forced re-run's id is not derivable)."""
        if self.id_file is None or not self.id_file.parent.is_dir():
            return
        try:
            tmp = self.id_file.with_suffix(".tmp")
            tmp.write_text(str(self.experiment.id) + "\n")
            os.replace(tmp, self.id_file)
        except OSError as exc:
            log.warning("could not write %s: %s", self.id_file, exc)


def summarise(loggers: list[Any], record: dict[str, Any]) -> None:
    for lg in loggers:
        exp = getattr(lg, "experiment", None)
        if exp is None or not hasattr(exp, "summary"):
            continue
        keys = (
            "status",
            "final_train_loss",
            "final_val_loss",
            "unstable_lr",
            "spike_step",
            "lr",
            "batch_size",
            "accumulate_grad_batches",
            "tokens_seen",
            "tokens_per_second",
            "mfu",
            "z_over_x",
            "gradient_noise_scale",
        )
        summary = {k: record[k] for k in keys if record.get(k) is not None}
        summary.update({k: v for k, v in lr_xyz(record).items() if v is not None})
        exp.summary.update(summary)


def lr_xyz(record: dict[str, Any]) -> dict[str, float | None]:
    """The seed's x (unstable LR), y (small batch peak) and z (large batch peak) as far as this
    run knows them, under one name in every run so a dashboard can plot them side by side."""
    exp, deriv = record.get("experiment"), record.get("derivation") or {}
    return {
        "lr_x_unstable": record.get("unstable_lr"),
        "lr_y_small": {SMALL_BATCH: record.get("lr"), LARGE_BATCH: deriv.get("small_lr")}.get(
            str(exp)
        ),
        "lr_z_large": record.get("lr") if exp == LARGE_BATCH else None,
    }


def finish_wandb(loggers: list[Any]) -> None:
    """Finish the run and stop wandb's service process, so nothing is left running."""
    if not loggers:
        return
    try:
        import wandb

        if wandb.run is not None:
            # No ``quiet=``: wandb 0.31 has no such argument, and the TypeError it raised left the
            # run unfinished and the next run in the same process attached to the dead one.
            wandb.finish()
    except Exception as exc:
        log.warning("wandb.finish failed: %s", exc)
    teardown()


def teardown() -> None:
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass


def wandb_record(loggers: list[Any]) -> dict[str, Any]:
    """``{"wandb": {...}}`` for the run's record while its wandb run is live, else ``{}`` (so a
    run without wandb keeps its record's fields): the run id; ``path``, project/id online (the
    run's address) and the local run folder offline; and every local folder of the id, one per
    process of the run, oldest first (what ``wandb sync`` uploads)."""
    for lg in loggers:
        run = getattr(lg, "_experiment", None)  # never start a run here
        if not _is_live_run(run):
            continue
        try:
            folder = Path(run.settings.sync_dir)
            return {
                "wandb": {
                    "id": run.id,
                    "mode": "offline" if run.offline else "online",
                    "project": run.project,
                    "path": str(folder) if run.offline else run.path,
                    "folders": [str(p) for p in run_folders(folder.parent, run.id)],
                }
            }
        except Exception as exc:  # the record matters more than its wandb field
            log.warning("wandb: could not describe the run for the record: %s", exc)
    return {}


def resolve_wandb_mode(cfg_mode: str, env: Mapping[str, str] | None = None) -> str:
    """offline, online or disabled: ``WANDB_MODE`` (or ``WANDB_DISABLED``) in the environment
    wins, so a cluster job or a user can switch wandb without editing config; otherwise the
    config's ``logger.wandb_mode`` (offline by default, online with ``logger=wandb_online``)."""
    env = os.environ if env is None else env
    if env.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled"
    raw = env.get("WANDB_MODE", "").strip().lower()
    if not raw:
        return cfg_mode
    mode = _ENV_MODES.get(raw)
    if mode is None:
        log.warning(
            "WANDB_MODE=%s is not offline, online or disabled: using logger.wandb_mode=%s",
            raw,
            cfg_mode,
        )
        return cfg_mode
    return mode


def wandb_run_id(study_dir: str | os.PathLike[str], run_id: str, generation: str = "") -> str:
    """The wandb run id of a training run: the same for every process of the run (so a resumed
    process continues it), different across study folders that hold the same run id (so they
    never share a wandb run). The run id, made wandb-safe (lower-case letters, digits, dashes),
    then a hash of the study folder, run id and ``generation`` (a forced re-run's); <= 64 chars."""
    key = f"{Path(study_dir).resolve()}\n{run_id}\n{generation}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower())[: WANDB_ID_MAX - len(digest) - 1]
    slug = slug.strip("-")
    return f"{slug}-{digest}" if slug else digest


def choose_wandb_run_id(
    study_dir: str | os.PathLike[str],
    run_id: str,
    run_dir: str | os.PathLike[str] | None,
    wandb_dir: Path,
    force: bool,
) -> str:
    """The id the run folder remembers (``wandb_run_id`` file), else :func:`wandb_run_id`; with
    ``force`` (start over) a new one when the old one already has local folders, so the re-run's
    steps are not taken for rows the wandb run holds."""
    wid = wandb_run_id(study_dir, run_id)
    if run_dir is not None:
        try:
            saved = (Path(run_dir) / WANDB_ID_FILE).read_text().strip()
        except OSError:
            saved = ""
        if _VALID_ID.match(saved):
            wid = saved
    if force and run_folders(wandb_dir, wid):
        wid = wandb_run_id(study_dir, run_id, generation=f"{time.time_ns()}-{os.getpid()}")
    return wid


def run_folders(wandb_dir: Path, wid: str) -> list[Path]:
    """The local folders of wandb run ``wid`` (``[offline-]run-<time>-<wid>``, one per process
    that opened it), oldest first."""
    if not wandb_dir.is_dir():
        return []
    out = []
    for p in wandb_dir.iterdir():
        m = _RUN_FOLDER.match(p.name)
        if m and m["id"] == wid and p.is_dir():
            out.append(p)
    return sorted(out, key=lambda p: p.name.removeprefix("offline-"))


def _avoid_folder_clash(wandb_dir: Path, wid: str) -> None:
    """wandb names a run's local folder by the second the process opens it: a process of the
    same run opening it within the second of the previous one would share its folder. Wait
    for the next second then."""
    folders = run_folders(wandb_dir, wid)
    if not folders:
        return
    now = time.time()
    stamps = {time.strftime("%Y%m%d_%H%M%S", f(now)) for f in (time.localtime, time.gmtime)}
    if any(f"-{stamp}-" in p.name for p in folders for stamp in stamps):
        time.sleep(1.05 - now % 1)


def row_kind(metrics: Mapping[str, Any]) -> str | None:
    """The row's kind: val (validation), train (an optimizer step), or None (anything else)."""
    if any(k.startswith("val/") for k in metrics):
        return "val"
    if any(k.startswith("train/") for k in metrics):
        return "train"
    return None


def logged_rows(folder: Path) -> set[tuple[str, int]]:
    """(kind, step) of every history row in a local run folder's ``run-<id>.wandb`` file: what
    wandb received from that process. A file cut short (the process killed) reads up to its
    last whole record."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: set[tuple[str, int]] = set()
    for path in folder.glob("run-*.wandb"):
        for raw in _wandb_records(path):
            rec = pb.Record()
            try:
                rec.ParseFromString(raw)
            except Exception:  # a damaged tail
                break
            if rec.WhichOneof("record_type") != "history":
                continue
            items = {(i.key or "/".join(i.nested_key)): i.value_json for i in rec.history.item}
            try:
                step = int(float(json.loads(items.get("trainer/global_step", items["_step"]))))
            except (KeyError, TypeError, ValueError):
                continue
            if any(k.startswith("val/") for k in items):
                out.add(("val", step))
            if any(k.startswith("train/") for k in items):
                out.add(("train", step))
    return out


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a .wandb file: a LevelDB-style log (header ':W&B' and 3 bytes, then 32 KiB
    blocks of records framed by a 4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first,
    3 middle, 4 last). Stops at a record the file does not hold whole."""
    block = 32768
    try:
        data = path.read_bytes()
    except OSError:
        return
    if data[:4] != b":W&B":
        return
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding (a preallocated or torn tail)
            return
        end = pos + 7 + length
        if end > len(data):
            return
        chunk, pos = data[pos + 7 : end], end
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
        else:
            return


def csv_rows(path: Path, upto: int) -> list[tuple[int, dict[str, float]]]:
    """metrics.csv's rows of steps 1..``upto`` as (step, metrics) with the keys live logging uses
    (recorder.StepRecorder), training before validation within a step; the last row of a step
    wins, as in metrics.read_metrics."""
    train: dict[int, dict[str, float]] = {}
    val: dict[int, dict[str, float]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                step = int(float(row.get("step") or "nan"))
            except (TypeError, ValueError):
                continue
            if not 1 <= step <= upto:
                continue
            keys = _TRAIN_KEYS if row.get("train_loss") else _VAL_KEYS
            metrics = {key: float(row[col]) for col, key in keys if row.get(col)}
            if row.get("tokens"):
                metrics["tokens_seen"] = int(float(row["tokens"]))
            if row.get("train_loss"):
                train[step] = metrics
            elif row.get("val_loss"):
                val[step] = {k: v for k, v in metrics.items() if math.isfinite(v)}
    out: list[tuple[int, dict[str, float]]] = []
    for step in sorted(set(train) | set(val)):
        out += [(step, rows[step]) for rows in (train, val) if step in rows]
    return out


def _is_live_run(run: Any) -> bool:
    """A real wandb run (not Lightning's stand-in on ranks > 0, nor None)."""
    if run is None:
        return False
    try:
        from wandb.sdk.wandb_run import Run
    except ImportError:
        return False
    return isinstance(run, Run)
