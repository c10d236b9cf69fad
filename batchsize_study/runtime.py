"""Where and how a run executes: the study folder, precision, world size, and the hashes that
name a run and say which records are comparable."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from batchsize_study.batch import BatchPlan, plan_batch
from batchsize_study.config import Config
from batchsize_study.errors import UserError
from batchsize_study.study import precheck_upstream, runs_dir, stable_hash

# Keys that do not change what a run computes: excluded from its configuration hash.
_NOT_HASHED = (
    "study",
    "host_allocator",
    "logger",
    "force",
    "upstream_wait_seconds",
    "checkpoint_every_steps",
    "compare",
    "evaluate",
    "sweep",  # an lr_sweep run is its LR and seed: a changed grid reuses the runs it shares
)
_NOT_HASHED_DATA = ("cache_dir", "num_workers")
_NOT_HASHED_TRAINER = ("enable_progress_bar", "enable_model_summary")

WRITE_ERRNOS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
)
"""OSErrors that mean 'this folder cannot take a file': a user's problem, told in one line."""


def study_dir(c: Config) -> str:
    """``study.dir`` as an absolute path (relative to the launch directory under Hydra)."""
    try:
        from hydra.utils import to_absolute_path

        return to_absolute_path(c.study.dir)
    except ValueError:  # not under Hydra
        return os.path.abspath(c.study.dir)


def cpu_supports_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX): there bf16 autocast is several
    times faster than fp32; on older CPUs it is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_cuda(accelerator: str | None) -> bool:
    """Whether Lightning will train on a CUDA device for this ``trainer.accelerator``."""
    return torch.cuda.is_available() and accelerator in (None, "auto", "gpu", "cuda")


NATIVE_BF16_CAPABILITY = (8, 0)
"""CUDA compute capability from which bf16 matmuls run natively on tensor cores (Ampere, sm_80).
``torch.cuda.is_bf16_supported()`` also says True on Turing and Pascal, where bf16 is emulated
(slower than fp16 with a GradScaler, and than fp32 on some kernels): it cannot decide alone."""


def auto_precision(device: str, capability: tuple[int, int] | None, cpu_bf16: bool) -> str:
    """precision=auto as a pure function of the hardware, so the rule is testable anywhere.

    ``device``: "cuda" or anything else (the CPU path); ``capability``: the lowest compute
    capability of the CUDA devices in use; ``cpu_bf16``: oneDNN runs bf16 natively
    (:func:`cpu_supports_bf16`). bf16-mixed only where bf16 is native (Ampere+ GPUs, AMX or
    AVX512-BF16 CPUs); 16-mixed (Lightning adds a GradScaler) on older CUDA cards; else fp32.
    """
    if device == "cuda":
        if capability is not None and tuple(capability) >= NATIVE_BF16_CAPABILITY:
            return "bf16-mixed"
        return "16-mixed"
    return "bf16-mixed" if cpu_bf16 else "32-true"


def cuda_capability() -> tuple[int, int] | None:
    """The lowest compute capability among the visible CUDA devices (a mixed machine gets the
    precision every card runs natively); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return min(caps) if caps else None


def resolve_precision(setting: str, accelerator: str | None) -> str:
    """auto: :func:`auto_precision` for this machine; any other setting is passed through."""
    if setting != "auto":
        return setting
    if uses_cuda(accelerator):
        return auto_precision("cuda", cuda_capability(), cpu_bf16=False)
    return auto_precision("cpu", None, cpu_supports_bf16())


GPU_LOG_EVERY_STEPS = 20
"""logger.log_every_steps=null on a GPU: see LoggerConfig.log_every_steps."""


def resolve_log_every_steps(setting: int | None, accelerator: str | None) -> int:
    """null (auto): 1 on CPU (a host sync is free there), GPU_LOG_EVERY_STEPS on a GPU."""
    if setting is not None:
        return setting
    return GPU_LOG_EVERY_STEPS if uses_cuda(accelerator) else 1


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_host_allocator(setting: str, accelerator: str | None) -> str:
    """Keep freed host memory in the process when a run trains on the CPU; returns what was done.

    glibc hands large freed blocks back to the kernel (munmap of mmapped chunks, trimming of the
    heap's top), so a CPU step that allocates and frees its activations, logits and gradients
    faults their pages in again: ~34k minor faults and 60-70 ms of kernel CPU per small_batch
    step here. With mmap off (M_MMAP_MAX=0) and trimming off (M_TRIM_THRESHOLD at its maximum)
    freed blocks are reused from the heap: tokens/s +12 % (paired, bare loop; +1 to +17 % in
    the default study's records), peak resident memory +13 % (773 ->
    873 MB for a 300-step small_batch run; 872 MB after 900 steps: no creep; benchmarks/README.md
    section 1c). PyTorch's performance tuning guide names the same cost for CPU training and
    recommends jemalloc or tcmalloc ("Switch Memory allocator",
    pytorch.org/tutorials/recipes/recipes/tuning_guide.html); this needs no preload. GPU runs
    allocate their tensors on the device: left alone."""
    if setting == "system":
        return "system"
    if uses_cuda(accelerator) or platform.libc_ver()[0] != "glibc":
        return "system"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc: mmap and trim off" if ok else "system"


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
    """A hash of everything that changes what the run computes (the peak LR included)."""
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


def compat_key(c: Config, corpus_fingerprint: str) -> str:
    """Records are comparable when model, corpus, tokenizer and sequence length agree."""
    return stable_hash({"model": asdict(c.model), "corpus": corpus_fingerprint})


def check_writable(sdir: str) -> None:
    """Fail before any work when the study folder cannot take a file (read-only, not a folder).

    The probe file goes into the deepest folder that already exists on the way to the runs
    folder; nothing is created, so a run refused later (a missing upstream record, a bad split)
    leaves nothing behind, and jobs of one multirun starting together (submitit, joblib) cannot
    remove a folder another job is probing or about to write to.
    """
    target = runs_dir(sdir)
    probe_dir = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe_dir))
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"study.dir={sdir}: cannot write there ({exc.strerror or exc}); choose a writable folder "
            "with study.dir=<path>"
        ) from None


def precheck_run(c: Config) -> tuple[str, int, BatchPlan]:
    """The checks of a training run that need neither the corpus nor Lightning: world size,
    batch split, a writable study folder, the upstream record. (study dir, world, plan).

    ``experiments.run`` calls this before it imports the training stack (Lightning,
    transformers, datasets: ~15 s on 2 cores), so these mistakes cost a second, not a start-up;
    :func:`training.train` calls it again for callers that enter there (probe, sweep).
    """
    sdir = study_dir(c)
    world = resolve_world_size(c.trainer)
    plan = plan_batch(c.batch_size, c.micro_batch_size, world, c.model.seq_len, c.max_steps)
    check_writable(sdir)
    precheck_upstream(c, sdir)
    return sdir, world, plan
