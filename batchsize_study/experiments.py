"""The experiment layer: one ``run(cfg)`` per step of the procedure. This is where a DictConfig
stops; below it everything takes typed arguments.

Reads top to bottom like a training script: validate, prepare data, derive the LR, build the
module, the callbacks, the loggers and the trainer, fit, write the record.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from batchsize_study import __version__
from batchsize_study.batch import BatchPlan, plan_batch
from batchsize_study.checkpointing import (
    AtomicCheckpointIO,
    InjectNaN,
    Preempted,
    ResumeCallback,
    StepCheckpoint,
    find_resume_checkpoint,
)
from batchsize_study.config import Config, validate
from batchsize_study.data import PreparedCorpus, TokenDataModule, prepare_corpus
from batchsize_study.errors import ConfigError, UserError
from batchsize_study.model import CausalLMModule
from batchsize_study.recorder import StepRecorder
from batchsize_study.spike import DestabilisationCallback, InstabilityDetector
from batchsize_study.study import (
    FINAL_STATUSES,
    RECORD,
    adam_sde_hparams,
    check_step_budget,
    find_small_batch,
    find_unstable_lr,
    large_batch_lr,
    make_run_id,
    read_records,
    runs_dir,
    small_batch_lr,
    stable_hash,
    write_json_atomic,
)

log = logging.getLogger("batchsize_study")

# Keys that do not change what a run computes: excluded from its configuration hash.
_NOT_HASHED = (
    "study",
    "logger",
    "force",
    "upstream_wait_seconds",
    "checkpoint_every_steps",
    "compare",
    "sweep",  # an lr_sweep run is its LR and seed: a changed grid reuses the runs it shares
)
_NOT_HASHED_DATA = ("cache_dir", "num_workers")
_NOT_HASHED_TRAINER = ("enable_progress_bar", "enable_model_summary")


def run(cfg: DictConfig | Config) -> dict[str, Any]:
    """Entry point of every experiment (called by ``__main__`` and by tests)."""
    c = validate(cfg)
    if c.task == "compare":
        from batchsize_study.report import run_compare

        return run_compare(c)
    if c.task == "stability_probe":
        from batchsize_study.probe import run_probe

        return run_probe(c)
    if c.task == "lr_sweep":
        from batchsize_study.sweep import run_sweep

        return run_sweep(c)
    return train(c)


# ---------------------------------------------------------------- helpers


def study_dir(c: Config) -> str:
    try:
        from hydra.utils import to_absolute_path

        return to_absolute_path(c.study.dir)
    except ValueError:  # not under Hydra
        return os.path.abspath(c.study.dir)


def resolve_precision(setting: str, accelerator: str | None) -> str:
    """auto: bf16-mixed where the hardware runs bf16 matmuls natively (AMX/AVX512-BF16 CPUs,
    Ampere+ GPUs), 16-mixed on older GPUs, else fp32."""
    if setting != "auto":
        return setting
    use_cuda = torch.cuda.is_available() and accelerator in (None, "auto", "gpu", "cuda")
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if cpu_supports_bf16():
        return "bf16-mixed"
    return "32-true"


def cpu_supports_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX): there bf16 autocast is several
    times faster than fp32; on older CPUs it is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_world_size(trainer_cfg: dict[str, Any]) -> int:
    """devices x num_nodes as Lightning will resolve them (checked against the Trainer later)."""
    devices = trainer_cfg.get("devices", "auto")
    accelerator = trainer_cfg.get("accelerator", "auto")
    gpus = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif devices in ("auto", None):
        n = gpus if gpus else 1
    elif isinstance(devices, str):
        n = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    else:
        n = int(devices)
    if n == -1:
        n = gpus if gpus else (os.cpu_count() or 1)
    return n * int(trainer_cfg.get("num_nodes", 1))


def config_hash(c: Config, peak_lr: float) -> str:
    d = OmegaConf.to_container(OmegaConf.structured(c), resolve=True)
    assert isinstance(d, dict)
    for k in _NOT_HASHED:
        d.pop(k, None)
    for k in _NOT_HASHED_DATA:
        d["data"].pop(k, None)
    for k in _NOT_HASHED_TRAINER:
        d["trainer"].pop(k, None)
    d["lr"] = peak_lr
    return stable_hash(d)


def compat_key(c: Config, corpus: PreparedCorpus) -> str:
    """Records are comparable when model, corpus, tokenizer and sequence length agree."""
    return stable_hash({"model": asdict(c.model), "corpus": corpus.fingerprint})


# ---------------------------------------------------------------- LR derivation


def derive_lr(c: Config, sdir: str, key: str) -> tuple[float, str, dict[str, Any]]:
    """(peak LR, lr_source, extra record fields) for this run."""
    extra: dict[str, Any] = {}
    if c.task == "superconvergence":
        return float(c.lr), "given: the too-high warmup target (lr)", extra  # type: ignore[arg-type]
    if c.task == "stability_probe":  # batchsize_study.probe sets lr = multiple * x
        return float(c.lr), "given: stability probe, lr = multiple * x", extra  # type: ignore[arg-type]
    if c.task == "lr_sweep":  # batchsize_study.sweep sets lr per grid point
        return float(c.lr), "given: lr sweep grid point", extra  # type: ignore[arg-type]
    if c.task == "small_batch":
        if c.lr is not None:
            return c.lr, "given: lr on the command line/config", extra
        up = find_unstable_lr(sdir, c.seed, key, c.batch_size, c.upstream_wait_seconds)
        y = small_batch_lr(up.value, c.lr_factor)
        extra.update(unstable_lr=up.value, lr_factor=c.lr_factor, upstream=up.paths)
        return (
            y,
            f"derived: y = {c.lr_factor} * x, x = {up.value:.6g} ({up.selection}) from {', '.join(up.paths)}",
            extra,
        )
    # large_batch
    try:
        up = find_small_batch(sdir, c.seed, key, c.upstream_wait_seconds)
    except Exception:
        if c.lr is None:
            raise
        up = None
    if up is not None:
        small = up.records[-1]
        check_step_budget(small, c.max_steps, c.warmup_steps, c.allow_step_mismatch)
        b_small = int(small["batch_size"])
        xs = [r.get("unstable_lr") for r in up.records if r.get("unstable_lr")]
        extra.update(
            small_batch_size=b_small,
            small_lr=up.value,
            small_max_steps=small.get("max_steps"),
            small_warmup_steps=small.get("warmup_steps"),
            unstable_lr=float(sorted(xs)[len(xs) // 2]) if xs else None,
            lr_scaling_alpha=c.lr_scaling.alpha,
            upstream=up.paths,
        )
    if c.lr is not None:
        return c.lr, "given: lr on the command line/config", extra
    assert up is not None
    if c.batch_size == extra["small_batch_size"]:
        log.warning(
            "large_batch has the same batch_size=%d as the small run; the comparison is void",
            c.batch_size,
        )
    z = large_batch_lr(up.value, extra["small_batch_size"], c.batch_size, c.lr_scaling.alpha)
    source = (
        f"derived: z = y * (B_large/B_small)^alpha = {up.value:.6g} * ({c.batch_size}/{extra['small_batch_size']})"
        f"^{c.lr_scaling.alpha} ({up.selection}) from {', '.join(up.paths)}"
    )
    return z, source, extra


# ---------------------------------------------------------------- training


def _build_loggers(c: Config, sdir: str, run_id: str, record_config: dict[str, Any]) -> list[Any]:
    from batchsize_study.wandb_utils import make_wandb_logger

    lg = make_wandb_logger(c.logger, sdir, c.study.name, c.task, run_id, record_config)
    return [lg] if lg is not None else []


def train(c: Config, extra_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One training run; ``extra_record`` joins the record's derivation (e.g. a probe's multiple)."""
    t0 = time.time()
    sdir = study_dir(c)
    check_writable(sdir)
    corpus = prepare_corpus(c.data, c.model.seq_len)
    key = compat_key(c, corpus)
    peak_lr, lr_source, extra = derive_lr(c, sdir, key)
    extra.update(extra_record or {})
    chash = config_hash(c, peak_lr)
    run_id = make_run_id(c.task, c.batch_size, c.seed, chash)
    run_dir = runs_dir(sdir) / run_id
    record_path = run_dir / RECORD

    existing = _existing_record(record_path)
    if existing is not None and not c.force:
        log.info(
            "run %s already finished (status %s): reporting its record; force=true re-runs it",
            run_id,
            existing["status"],
        )
        return existing

    world = resolve_world_size(c.trainer)
    plan = plan_batch(c.batch_size, c.micro_batch_size, world, c.model.seq_len, c.max_steps)
    measure_noise = c.noise.enabled and c.task in ("small_batch", "large_batch")
    if measure_noise:
        from batchsize_study.noise import noise_micro_batch

        micro = noise_micro_batch(
            c.micro_batch_size, plan.accumulate_grad_batches, world, c.noise.split
        )
        if micro != c.micro_batch_size:  # same sequences, two batch sizes (see noise.py)
            log.info("noise scale: micro batch %d run as %d", c.micro_batch_size, micro)
            extra.update(
                noise_split={"micro_batch_size": c.micro_batch_size, "split": c.noise.split}
            )
            c = replace(c, micro_batch_size=micro)
            plan = plan_batch(c.batch_size, micro, world, c.model.seq_len, c.max_steps)
    optim = c.optim
    if c.lr_scaling.adam_sde and c.task == "large_batch" and extra.get("small_batch_size"):
        ratio = c.batch_size / extra["small_batch_size"]
        betas, eps = adam_sde_hparams(list(optim.betas), optim.eps, ratio)
        optim = type(optim)(**{**asdict(optim), "betas": betas, "eps": eps})
        extra.update(adam_sde={"ratio": ratio, "betas": betas, "eps": eps})
        if min(betas) <= 0.0:  # kappa (1 - beta) >= 1: the SDE rule has left its range
            log.warning(
                "lr_scaling.adam_sde: batch ratio %g makes beta <= 0 (betas %s, clamped at 0); "
                "the SDE rule holds for ratios below 1 / (1 - beta)",
                ratio,
                betas,
            )
        if c.lr_scaling.alpha != 0.5:
            log.warning(
                "lr_scaling.adam_sde=true belongs with the square-root LR rule (alpha=0.5), "
                "not alpha=%g (Malladi et al. 2022)",
                c.lr_scaling.alpha,
            )

    pl.seed_everything(c.seed, workers=True, verbose=False)
    module = CausalLMModule(
        c.model,
        optim,
        c.schedule,
        corpus.vocab_size,
        peak_lr,
        c.max_steps,
        c.warmup_steps,
        compile=c.compile,
    )
    precision = resolve_precision(c.precision, c.trainer.get("accelerator"))
    log.info("run %s -> %s", run_id, run_dir)
    log.info(
        "model: %s, %s parameters, vocab %d, seq_len %d, precision %s",
        c.model.arch,
        f"{module.num_parameters:,}",
        corpus.vocab_size,
        c.model.seq_len,
        precision,
    )
    log.info("batch: %s", plan.describe())
    log.info("peak lr %.6g (%s)", peak_lr, lr_source)

    from batchsize_study.flops import flops_per_token, peak_flops_per_device

    fpt = flops_per_token(module.model, c.model.seq_len)
    peak = c.peak_flops or peak_flops_per_device(precision)
    recorder = StepRecorder(
        str(run_dir / "metrics.csv"), plan.tokens_per_step, c.logger.log_every_steps, fpt, peak
    )
    detector = DestabilisationCallback(
        InstabilityDetector.from_config(c.detector), stop_on_rise=(c.task == "superconvergence")
    )
    callbacks: list[pl.Callback] = [recorder, detector]
    noise_cb = None
    world_micro = plan.micro_batch_size  # one micro-batch on one rank: the small batch
    if measure_noise and c.batch_size > world_micro:
        from batchsize_study.noise import NoiseScaleCallback

        noise_cb = NoiseScaleCallback(world_micro, c.batch_size, c.noise.ema)
        callbacks.insert(0, noise_cb)  # before the recorder: its flush reads this step's EMAs
    keep_model = c.task in ("small_batch", "large_batch")
    ckpt_dir = run_dir / "checkpoints"
    resume = None
    if keep_model:
        if c.force:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # force: start over, not resume
        resume = find_resume_checkpoint(ckpt_dir)
        if resume is not None:
            # The sampler skips the consumed samples itself (data.py): Lightning's warning that
            # the loader is "not resumable" does not apply.
            warnings.filterwarnings(
                "ignore", message="You're resuming from a checkpoint that ended"
            )
            log.info("resuming run %s from %s (step %d)", run_id, resume[0], resume[1])
        callbacks.append(
            StepCheckpoint(
                c.val_every_steps,
                dirpath=str(ckpt_dir),
                filename="step{step:06d}",
                auto_insert_metric_name=False,
                every_n_train_steps=c.checkpoint_every_steps,
                save_top_k=2,  # the newest two: a fall-back if the newest is damaged later
                monitor="step",
                mode="max",
                save_last=True,
            )
        )
    resume_cb = ResumeCallback(ckpt_dir / "last.ckpt" if keep_model else None, c.val_every_steps)
    callbacks.append(resume_cb)
    inject = InjectNaN.from_env()
    if inject is not None:
        callbacks.append(inject)
    record_config = {
        **OmegaConf.to_container(OmegaConf.structured(c), resolve=True),  # type: ignore[dict-item]
        "derived": {**plan.as_dict(), "peak_lr": peak_lr, "lr_source": lr_source, **extra},
        "run_id": run_id,
    }
    loggers = _build_loggers(c, sdir, run_id, record_config)
    val_interval = c.val_every_steps * plan.accumulate_grad_batches
    trainer_kwargs: dict[str, Any] = {
        "max_steps": c.max_steps,
        "precision": precision,
        "accumulate_grad_batches": plan.accumulate_grad_batches,
        "val_check_interval": val_interval if c.val_every_steps < c.max_steps else None,
        "check_val_every_n_epoch": None if c.val_every_steps < c.max_steps else 1,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,
        "enable_checkpointing": keep_model,
        "default_root_dir": str(run_dir),
        "log_every_n_steps": 1,
        "logger": loggers if loggers else False,
        "callbacks": callbacks,
        "enable_model_summary": False,
    }
    if keep_model:
        trainer_kwargs["plugins"] = [AtomicCheckpointIO()]
    trainer_kwargs.update(c.trainer)
    try:
        trainer = pl.Trainer(**trainer_kwargs)
        _check_launcher(trainer, c)
        if trainer.world_size != world:
            raise ConfigError(
                "trainer.devices",
                c.trainer.get("devices"),
                f"Lightning resolved {trainer.world_size} processes, not {world}; set trainer.devices explicitly",
            )
    except BaseException:
        from batchsize_study.wandb_utils import finish_wandb

        finish_wandb(loggers)  # refused before training: leave no wandb run or process behind
        raise
    datamodule = TokenDataModule(
        c.data,
        corpus,
        c.model.seq_len,
        c.micro_batch_size,
        c.seed,
        samples_per_rank=c.max_steps * plan.accumulate_grad_batches * c.micro_batch_size,
    )
    status, message = "failed", ""
    write_error: OSError | None = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume[0] if resume else None)
        if _needs_final_validation(c, trainer, recorder, detector, keep_model):
            trainer.validate(module, datamodule=datamodule, verbose=False)
        if keep_model and trainer.global_step > 0:
            trainer.save_checkpoint(str(ckpt_dir / "last.ckpt"))
        status, message = _status(c, trainer, detector)
    except Preempted:
        status = "interrupted"
        message = (
            f"pre-empted (SIGTERM) at step {resume_cb.interrupted_at} of {c.max_steps}; "
            "run the same command to resume"
        )
    except KeyboardInterrupt:
        status, message = "interrupted", "interrupted by the user"
        raise
    except OSError as exc:  # disk full, folder removed or read-only under a running job
        if exc.errno not in _WRITE_ERRNOS:
            raise
        write_error = exc
        status, message = (
            "failed",
            f"could not write {exc.filename or 'output'}: {exc.strerror or exc}",
        )
    finally:
        record = _record(
            c,
            trainer,
            plan,
            corpus,
            key,
            chash,
            run_id,
            run_dir,
            peak_lr,
            lr_source,
            extra,
            recorder,
            detector,
            noise_cb,
            optim,
            status,
            message,
            ckpt_dir if keep_model else None,
            fpt,
            peak,
            t0,
        )
        if trainer.is_global_zero:
            try:
                write_json_atomic(record_path, record)
            except OSError as exc:
                write_error = write_error or exc
                log.error("could not write the record %s: %s", record_path, exc)
            _summarise_wandb(loggers, record)
        from batchsize_study.wandb_utils import finish_wandb

        finish_wandb(loggers)
    if write_error is not None:
        raise UserError(
            f"study.dir={sdir}: writing {write_error.filename or 'output'} failed "
            f"({write_error.strerror or write_error}); free space or choose a writable study.dir "
            "(records already there are untouched; the same command resumes from the last checkpoint)"
        )
    if trainer.is_global_zero:
        _announce(record)
    if status == "interrupted":
        raise SystemExit(143)  # 128 + SIGTERM: a launcher or scheduler sees a pre-empted job
    return record


_WRITE_ERRNOS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
)


def check_writable(sdir: str) -> None:
    """Fail before any work when the study folder cannot take a file (read-only, not a folder).

    Folders created only for the probe are removed again, so a run refused later (a missing
    upstream record, a bad split) leaves nothing behind.
    """
    runs = runs_dir(sdir)
    created = [p for p in (runs, *runs.parents) if not p.exists()]
    try:
        runs.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=runs)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"study.dir={sdir}: cannot write there ({exc.strerror or exc}); choose a writable folder "
            "with study.dir=<path>"
        ) from None
    finally:
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break


def _check_launcher(trainer: pl.Trainer, c: Config) -> None:
    """Multi-process runs that cannot give a correct record are refused before any work.

    Lightning's ``ddp`` re-launches the command line for ranks > 0: inside a Hydra multirun that
    would re-run the whole sweep. ``ddp_spawn`` trains in spawned processes and hands back only
    the weights, so the record (steps, losses, status) would be wrong. SLURM (srun starts the
    ranks, SLURMEnvironment) and a single ``ddp`` command are fine.
    """
    from lightning.pytorch.strategies.launchers import (
        _MultiProcessingLauncher,
        _SubprocessScriptLauncher,
    )

    launcher = trainer.strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher):
        raise ConfigError(
            "trainer.strategy",
            c.trainer.get("strategy"),
            "spawned processes keep the run's state, so its record would be wrong; use "
            "trainer.strategy=ddp (one command per run) or a cluster launcher (hydra/launcher=slurm)",
        )
    if not isinstance(launcher, _SubprocessScriptLauncher):
        return
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        multirun = False
    if multirun:
        raise ConfigError(
            "trainer.strategy",
            c.trainer.get("strategy"),
            "ddp re-launches the command, which inside a multirun (-m) would re-run the sweep; run "
            "each DDP experiment as its own command, or use a cluster launcher "
            "(hydra/launcher=slurm) where srun starts the ranks",
        )


def _needs_final_validation(
    c: Config, trainer: pl.Trainer, recorder: StepRecorder, detector: Any, keep_model: bool
) -> bool:
    """The record's final validation loss must be the final model's: validate once more when the
    periodic schedule did not land on the last step. Decided from the config and the step count
    only, so every DDP rank reaches the same answer."""
    periodic = c.val_every_steps < c.max_steps
    return (
        (keep_model or c.task == "lr_sweep")  # a sweep point's answer is its final val loss
        and c.val_at_end
        and periodic
        and c.max_steps % c.val_every_steps != 0
        and trainer.global_step == c.max_steps
        and recorder.steps_recorded > 0
        and detector.failure is None
    )


def _existing_record(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    recs = [r for r in read_records(path.parent.parent.parent) if r["_path"] == str(path)]
    if recs and recs[0].get("status") in FINAL_STATUSES:
        return recs[0]
    return None


def _status(c: Config, trainer: pl.Trainer, detector: DestabilisationCallback) -> tuple[str, str]:
    v = detector.verdict
    if detector.failure and c.task in ("stability_probe", "lr_sweep"):  # an answer, not a fault
        return "diverged", detector.failure
    if detector.failure:
        return "failed", detector.failure
    if c.task == "superconvergence":
        if v.destabilised:
            msg = f"destabilised: onset at step {v.onset_step}, lr {v.onset_lr:.6g}; {v.reason}"
            if (
                v.onset_step is not None
                and v.onset_step <= c.detector.ignore_first + c.detector.patience
            ):
                msg += (
                    f". warning: the onset is within the first {c.detector.ignore_first + c.detector.patience} "
                    "steps the detector watches, so x is poorly resolved; lower lr or raise max_steps (a "
                    "slower warmup) and run superconvergence again"
                )
            return "diverged", msg
        return "no_divergence", (
            f"no destabilisation within {trainer.global_step} steps up to lr={c.lr}; raise lr (e.g. lr={c.lr * 4:g}) "
            "or max_steps, and run superconvergence again"
        )
    if trainer.global_step < c.max_steps:
        return "failed", f"stopped at step {trainer.global_step} of {c.max_steps}"
    note = ""
    if v.destabilised:
        note = f"warning: the loss rose at step {v.onset_step} (lr {v.onset_lr:.6g}): {v.reason}"
    return "completed", note


def _record(
    c: Config,
    trainer: pl.Trainer,
    plan: BatchPlan,
    corpus: PreparedCorpus,
    key: str,
    chash: str,
    run_id: str,
    run_dir: Path,
    peak_lr: float,
    lr_source: str,
    extra: dict[str, Any],
    recorder: StepRecorder,
    detector: DestabilisationCallback,
    noise_cb: Any,
    optim: Any,
    status: str,
    message: str,
    ckpt_dir: Path | None,
    fpt: float,
    peak: float | None,
    t0: float,
) -> dict[str, Any]:
    v = detector.verdict
    steps = trainer.global_step
    tps = sorted(recorder.tokens_per_second)
    tokens_per_second = tps[len(tps) // 2] if tps else None
    val = (
        getattr(trainer.lightning_module, "last_val", {})
        if trainer.lightning_module is not None
        else {}
    )
    rec: dict[str, Any] = {
        "experiment": c.task,
        "status": status,
        "message": message,
        "run_id": run_id,
        "study": c.study.name,
        "seed": c.seed,
        "batch_size": c.batch_size,
        "micro_batch_size": c.micro_batch_size,
        "devices": plan.world_size,
        "accumulate_grad_batches": plan.accumulate_grad_batches,
        "seq_len": c.model.seq_len,
        "tokens_per_step": plan.tokens_per_step,
        "max_steps": c.max_steps,
        "warmup_steps": c.warmup_steps,
        "lr": peak_lr,
        "lr_source": lr_source,
        "unstable_lr": extra.get("unstable_lr"),
        "spike_step": None,
        "steps_done": steps,
        "tokens_seen": steps * plan.tokens_per_step,
        "final_train_loss": recorder.final_train_loss,
        "final_val_loss": val.get("val/loss"),
        "final_val_ppl": val.get("val/ppl"),
        **_finals_from_csv(run_dir / "metrics.csv", recorder, val),
        "checkpoint": str(ckpt_dir / "last.ckpt")
        if ckpt_dir is not None and (ckpt_dir / "last.ckpt").exists()
        else None,
        "metrics_csv": str(run_dir / "metrics.csv"),
        "wall_seconds": round(time.time() - t0, 2),
        "tokens_per_second": tokens_per_second,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "mfu": (fpt * tokens_per_second / peak) if (tokens_per_second and peak) else None,
        "precision": trainer.precision,
        "config_hash": chash,
        "compat_key": key,
        "corpus_fingerprint": corpus.fingerprint,
        "vocab_size": corpus.vocab_size,
        "package_version": __version__,
        "finished_at": time.time(),
        "derivation": extra,
        "adam_betas": list(optim.betas),
        "adam_eps": optim.eps,
        "adam_sde": extra.get("adam_sde"),
    }
    if noise_cb is not None:
        rec["gradient_noise_scale"] = noise_cb.gradient_noise_scale  # sequences
        rec["noise"] = noise_cb.summary()
    if c.task == "stability_probe":
        rec["probe_multiple"] = extra.get("probe_multiple")
    if c.task == "lr_sweep":
        rec["sweep_multiple"] = extra.get("sweep_multiple")
    if c.task == "superconvergence" and v.destabilised:
        rec.update(
            unstable_lr=v.onset_lr,
            spike_step=v.onset_step,
            alarm_step=v.alarm_step,
            detector_reason=v.reason,
            onset_definition=v.definition,
            warmup_shape=c.schedule.warmup_shape,
            detector=asdict(c.detector),  # lets the report replay metrics.csv under other rules
        )
    if c.task == "large_batch" and extra.get("unstable_lr"):
        rec["z_over_x"] = peak_lr / extra["unstable_lr"]
        if rec["z_over_x"] > 1:
            log.info(
                "note: z = %.6g exceeds the measured unstable lr x = %.6g (z/x = %.2f); the seed expects the large "
                "batch to stay stable there",
                peak_lr,
                extra["unstable_lr"],
                rec["z_over_x"],
            )
    if c.task in ("small_batch", "large_batch", "stability_probe", "lr_sweep") and v.destabilised:
        rec["instability_warning"] = {
            "onset_step": v.onset_step,
            "onset_lr": v.onset_lr,
            "reason": v.reason,
        }
    if status == "failed" and recorder.nonfinite_step is not None:
        rec["failed_step"] = recorder.nonfinite_step
    return rec


def _finals_from_csv(path: Path, recorder: StepRecorder, val: dict[str, float]) -> dict[str, float]:
    """Final losses from metrics.csv when this process trained no step (a resume from a checkpoint
    written at max_steps, after a crash before the record): the CSV already holds them."""
    if recorder.final_train_loss is not None or not path.exists():
        return {}
    import csv
    import math

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    train = [x for x in train if math.isfinite(x)][-10:]
    vals = [r for r in rows if r.get("val_loss")]
    out: dict[str, float] = {}
    if train:
        out["final_train_loss"] = sum(train) / len(train)  # as StepRecorder.final_train_loss
    if vals and not val:
        out["final_val_loss"], out["final_val_ppl"] = (
            float(vals[-1]["val_loss"]),
            float(vals[-1]["val_ppl"]),
        )
    return out


def _summarise_wandb(loggers: list[Any], record: dict[str, Any]) -> None:
    from batchsize_study.wandb_utils import summarise

    summarise(loggers, record)


def _announce(rec: dict[str, Any]) -> None:
    log.info(
        "%s: status %s after %d steps (%s tokens) in %.1fs; final train loss %s, val loss %s",
        rec["experiment"],
        rec["status"],
        rec["steps_done"],
        f"{rec['tokens_seen']:,}",
        rec["wall_seconds"],
        _fmt(rec["final_train_loss"]),
        _fmt(rec["final_val_loss"]),
    )
    if rec["experiment"] == "superconvergence":
        if rec["status"] == "diverged":
            log.info(
                "unstable lr x = %.6g (onset at step %s)", rec["unstable_lr"], rec["spike_step"]
            )
        else:
            log.warning(rec["message"])
    elif rec.get("message"):
        log.warning(rec["message"])
    log.info("record: %s", Path(rec["metrics_csv"]).parent / RECORD)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
