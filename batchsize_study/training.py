"""One training run, top to bottom: plan the batch, check what can be checked, prepare the
tokens, derive the LR, build the module, callbacks, loggers and Trainer, fit, write the record.

Used by superconvergence, small_batch and large_batch, and by the multi-run experiments (the
stability probe) once per run.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import OmegaConf

from batchsize_study.batch import BatchPlan
from batchsize_study.checkpointing import (
    AtomicCheckpointIO,
    Preempted,
    ResumeCallback,
    StepCheckpoint,
    find_resume_checkpoint,
)
from batchsize_study.config import Config, OptimConfig
from batchsize_study.data import TokenDataModule, prepare_corpus
from batchsize_study.errors import ConfigError, UserError
from batchsize_study.flops import flops_per_token, peak_flops_per_device
from batchsize_study.metrics import METRICS
from batchsize_study.microbatch import check_setting as check_micro_batch_setting
from batchsize_study.microbatch import resolve_micro_batch
from batchsize_study.model import CausalLMModule, ModuleSettings
from batchsize_study.noise import NoiseScaleCallback, noise_micro_batch
from batchsize_study.progress import progress_bar
from batchsize_study.record import RunOutcome, announce, build_record
from batchsize_study.recorder import StepRecorder
from batchsize_study.runtime import (
    WRITE_ERRNOS,
    compat_key,
    config_hash,
    precheck_run,
    resolve_log_every_steps,
    resolve_precision,
    tune_host_allocator,
)
from batchsize_study.spike import DestabilisationCallback, DestabilisationDetector
from batchsize_study.study import (
    RECORD,
    adam_sde_hparams,
    derive_lr,
    existing_record,
    make_run_id,
    runs_dir,
    write_record,
)
from batchsize_study.study.stages import SMALL_BATCH, STAGES
from batchsize_study.wandb_utils import finish_wandb, make_wandb_logger, summarise, wandb_record

log = logging.getLogger("batchsize_study")


def train(c: Config, extra_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One training run; ``extra_record`` joins the record's derivation (e.g. a probe's multiple)."""
    t0 = time.time()
    # Checks that need no corpus come first: a wrong batch split or a missing upstream record
    # costs one line, not a corpus preparation.
    sdir, world, plan = precheck_run(c)
    check_micro_batch_setting(c, world)

    corpus = prepare_corpus(c.data, c.model.seq_len)
    key = compat_key(c, corpus.fingerprint)
    lr = derive_lr(c, sdir, key)
    lr.derivation.update(extra_record or {})
    chash = config_hash(c, lr.peak_lr)
    run_id = make_run_id(c.task, c.batch_size, c.seed, chash)
    run_dir = runs_dir(sdir) / run_id
    record_path = run_dir / RECORD
    existing = existing_record(record_path)
    if existing is not None and not c.force:
        log.info(
            "run %s already finished (status %s): reporting its record; force=true re-runs it",
            run_id,
            existing["status"],
        )
        return existing

    # micro_batch_size=auto becomes a number here, before the seed (its trial builds a model):
    # the run's hash and id keep the setting, its record the number and the setting.
    c, plan = resolve_micro_batch(
        c,
        plan,
        corpus.vocab_size,
        resolve_precision(c.precision, c.trainer.get("accelerator")),
        lr.derivation,
    )
    split = _noise_split(c, plan, world, lr.derivation)
    optim = _optimizer_settings(c, lr.derivation)
    pl.seed_everything(c.seed, workers=True, verbose=False)
    module = CausalLMModule(
        ModuleSettings(
            model=c.model,
            optim=optim,
            schedule=c.schedule,
            vocab_size=corpus.vocab_size,
            peak_lr=lr.peak_lr,
            max_steps=c.max_steps,
            warmup_steps=c.warmup_steps,
            compile=c.compile,
            noise_split=split,
            noise_split_every=c.noise.split_every,
        )
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
    log.info("peak lr %.6g (%s)", lr.peak_lr, lr.source)

    fpt = flops_per_token(module.model, c.model.seq_len)
    peak = c.peak_flops or peak_flops_per_device(precision)
    stage = STAGES[c.task]
    keep_model = stage.keeps_model
    ckpt_dir = run_dir / "checkpoints"
    resume = _resume_point(c, run_id, ckpt_dir) if keep_model else None

    detector = DestabilisationCallback(
        DestabilisationDetector.from_config(c.detector), stop_on_rise=stage.stops_on_rise
    )
    noise_cb = None
    b_small = plan.micro_batch_size // split
    if c.noise.enabled and stage.measures_noise and c.batch_size > b_small:
        noise_cb = NoiseScaleCallback(
            b_small, c.batch_size, c.noise.ema, c.noise.split_every if split > 1 else None
        )
    # The recorder feeds its consumers in this order: the noise scale's EMAs are read before the
    # detector decides, both from the same rows.
    recorder = StepRecorder(
        str(run_dir / METRICS),
        plan.tokens_per_step,
        resolve_log_every_steps(c.logger.log_every_steps, c.trainer.get("accelerator")),
        fpt,
        peak,
        consumers=[cb for cb in (noise_cb, detector) if cb is not None],
    )
    resume_cb = ResumeCallback(ckpt_dir / "last.ckpt" if keep_model else None, c.val_every_steps)
    callbacks: list[pl.Callback] = [
        cb for cb in (noise_cb, recorder, detector, resume_cb) if cb is not None
    ]
    if keep_model:
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
                # last.ckpt links to the newest step file instead of a second serialisation
                # and fsync of the same state (a 124M model with AdamW: ~1.5 GB per save);
                # where links are not allowed Lightning copies the file.
                save_last="link",
            )
        )
    callbacks += _configured_callbacks(c)
    bar = progress_bar(callbacks, bool(c.trainer.get("enable_progress_bar", True)))
    if bar is not None:
        callbacks.append(bar)

    allocator = tune_host_allocator(c.host_allocator, c.trainer.get("accelerator"))
    log.info("host allocator: %s", allocator)
    record_config = {
        **OmegaConf.to_container(OmegaConf.structured(c), resolve=True),  # type: ignore[dict-item]
        "derived": {
            **plan.as_dict(),
            "host_allocator": allocator,
            "peak_lr": lr.peak_lr,
            "lr_source": lr.source,
            **lr.derivation,
        },
        "run_id": run_id,
    }
    lg = make_wandb_logger(
        c.logger,
        sdir,
        c.study.name,
        c.task,
        run_id,
        record_config,
        run_dir=run_dir,  # a resumed process continues the run's wandb run (wandb_utils.py)
        resume_step=resume[1] if resume else 0,
        tokens_per_step=plan.tokens_per_step,
        force=c.force,
    )
    loggers = [lg] if lg is not None else []
    try:
        trainer = _build_trainer(c, plan, precision, callbacks, loggers, run_dir, keep_model)
        _check_launcher(trainer, c)
        if trainer.world_size != world:
            raise ConfigError(
                "trainer.devices",
                c.trainer.get("devices"),
                f"Lightning resolved {trainer.world_size} processes, not {world}; set trainer.devices explicitly",
            )
    except BaseException:
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
        if exc.errno not in WRITE_ERRNOS:
            raise
        write_error = exc
        status, message = (
            "failed",
            f"could not write {exc.filename or 'output'}: {exc.strerror or exc}",
        )
    finally:
        outcome = RunOutcome(
            config=c,
            plan=plan,
            run_id=run_id,
            run_dir=run_dir,
            config_hash=chash,
            compat_key=key,
            corpus={
                "fingerprint": corpus.fingerprint,
                "vocab_size": corpus.vocab_size,
                "token_hash": corpus.token_hash,
                "python_version": corpus.python_version,
            },
            lr=lr,
            optim=optim,
            status=status,
            message=message,
            steps_done=trainer.global_step,
            verdict=detector.verdict,
            started_at=t0,
            precision=str(trainer.precision),
            host_allocator=allocator,
            flops_per_token=fpt,
            peak_flops=peak,
            train_seconds=recorder.train_seconds,
            startup_steps=list(recorder.startup_steps),
            val=dict(module.last_val),
            noise=noise_cb.summary() if noise_cb is not None else None,
            gradient_noise_scale=noise_cb.gradient_noise_scale if noise_cb is not None else None,
            checkpoint=ckpt_dir / "last.ckpt" if keep_model else None,
            failed_step=recorder.nonfinite_step,
        )
        record = build_record(outcome)
        record.update(wandb_record(loggers))  # the wandb run's id and path, when wandb is on
        if trainer.is_global_zero:
            try:
                record = write_record(record_path, record)
            except OSError as exc:
                write_error = write_error or exc
                log.error("could not write the record %s: %s", record_path, exc)
            summarise(loggers, record)
        finish_wandb(loggers)
    if write_error is not None:
        raise UserError(
            f"study.dir={sdir}: writing {write_error.filename or 'output'} failed "
            f"({write_error.strerror or write_error}); free space or choose a writable study.dir "
            "(records already there are untouched; the same command resumes from the last checkpoint)"
        )
    if trainer.is_global_zero:
        announce(record)
    if status == "interrupted":
        raise SystemExit(143)  # 128 + SIGTERM: a launcher or scheduler sees a pre-empted job
    return record


# ---------------------------------------------------------------- before any work


def _noise_split(c: Config, plan: BatchPlan, world: int, derivation: dict[str, Any]) -> int:
    """With one micro-batch per step on one device: how many pieces the module runs a measured
    step's backward in, so that step holds two batch sizes (see noise.py); 1 = no split."""
    if not (c.noise.enabled and STAGES[c.task].measures_noise):
        return 1
    piece = noise_micro_batch(
        c.micro_batch_size, plan.accumulate_grad_batches, world, c.noise.split
    )
    if piece == c.micro_batch_size:
        return 1
    log.info(
        "noise scale: every %d. step's backward runs in %d pieces of %d",
        c.noise.split_every,
        c.noise.split,
        piece,
    )
    derivation.update(
        noise_split={
            "micro_batch_size": c.micro_batch_size,
            "split": c.noise.split,
            "every": c.noise.split_every,
        }
    )
    return c.noise.split


def _optimizer_settings(c: Config, derivation: dict[str, Any]) -> OptimConfig:
    """AdamW's settings; with lr_scaling.adam_sde the large batch's betas and eps follow the SDE
    rule (Malladi et al. 2022, Definition 4.2)."""
    optim = c.optim
    if not (
        c.lr_scaling.adam_sde
        and STAGES[c.task].needs == SMALL_BATCH  # a run whose LR scales from the small batch's
        and derivation.get("small_batch_size")
    ):
        return optim
    ratio = c.batch_size / derivation["small_batch_size"]
    betas, eps = adam_sde_hparams(list(optim.betas), optim.eps, ratio)
    derivation.update(adam_sde={"ratio": ratio, "betas": betas, "eps": eps})
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
    return OptimConfig(**{**asdict(optim), "betas": betas, "eps": eps})


def _resume_point(c: Config, run_id: str, ckpt_dir: Path) -> tuple[str, int] | None:
    if c.force:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # force: start over, not resume
    resume = find_resume_checkpoint(ckpt_dir)
    if resume is not None:
        # The sampler skips the consumed samples itself (data.py): Lightning's warning that the
        # loader is "not resumable" does not apply.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")
        log.info("resuming run %s from %s (step %d)", run_id, resume[0], resume[1])
    return resume


def _configured_callbacks(c: Config) -> list[pl.Callback]:
    """``callbacks.<name>`` nodes with a ``_target_``, instantiated by Hydra."""
    if not c.callbacks:
        return []
    from hydra.utils import instantiate

    out = []
    for name, node in c.callbacks.items():
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(
                f"callbacks.{name}",
                node,
                "give a node with _target_=<package.Class> and its arguments",
            )
        try:
            cb = instantiate(node)
        except Exception as exc:
            raise ConfigError(
                f"callbacks.{name}._target_", node["_target_"], f"could not be instantiated ({exc})"
            ) from None
        if not isinstance(cb, pl.Callback):
            raise ConfigError(
                f"callbacks.{name}._target_", node["_target_"], "must name a lightning Callback"
            )
        out.append(cb)
    return out


def _build_trainer(
    c: Config,
    plan: BatchPlan,
    precision: str,
    callbacks: list[pl.Callback],
    loggers: list[Any],
    run_dir: Path,
    keep_model: bool,
) -> pl.Trainer:
    """The Trainer: derived arguments (validated in config.py never to be overridden by
    ``trainer.*``), then the user's ``trainer.*`` (accelerator, devices, strategy, ...)."""
    val_interval = c.val_every_steps * plan.accumulate_grad_batches
    kwargs: dict[str, Any] = {
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
        kwargs["plugins"] = [AtomicCheckpointIO()]
    return pl.Trainer(**{**kwargs, **c.trainer})


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


# ---------------------------------------------------------------- after fit


def _needs_final_validation(
    c: Config, trainer: pl.Trainer, recorder: StepRecorder, detector: Any, keep_model: bool
) -> bool:
    """The record's final validation loss must be the final model's: validate once more when the
    periodic schedule did not land on the last step. Decided from the config and the step count
    only, so every DDP rank reaches the same answer."""
    periodic = c.val_every_steps < c.max_steps
    return (
        (keep_model or STAGES[c.task].final_validation)  # a sweep point's answer: its val loss
        and c.val_at_end
        and periodic
        and c.max_steps % c.val_every_steps != 0
        and trainer.global_step == c.max_steps
        and recorder.steps_recorded > 0
        and detector.failure is None
    )


def _status(c: Config, trainer: pl.Trainer, detector: DestabilisationCallback) -> tuple[str, str]:
    v = detector.verdict
    stage = STAGES[c.task]
    if detector.failure and stage.failure_is_answer:  # a measurement, not a fault
        return "diverged", detector.failure
    if detector.failure:
        return "failed", detector.failure
    if stage.stops_on_rise:
        if v.destabilised:
            msg = f"destabilised: onset at step {v.onset_step}, lr {v.onset_lr:.6g}; {v.reason}"
            watched = c.detector.ignore_first + c.detector.patience
            if v.onset_step is not None and v.onset_step <= watched:
                msg += (
                    f". warning: the onset is within the first {watched} steps the detector "
                    "watches, so x is poorly resolved; lower lr or raise max_steps (a slower "
                    "warmup) and run superconvergence again"
                )
            return "diverged", msg
        return "no_divergence", (
            f"no destabilisation within {trainer.global_step} steps up to lr={c.lr}; raise lr "
            f"(e.g. lr={c.lr * 4:g}) or max_steps, and run superconvergence again"  # type: ignore[operator]
        )
    if trainer.global_step < c.max_steps:
        return "failed", f"stopped at step {trainer.global_step} of {c.max_steps}"
    note = ""
    if v.destabilised:
        note = f"warning: the loss rose at step {v.onset_step} (lr {v.onset_lr:.6g}): {v.reason}"
    return "completed", note
