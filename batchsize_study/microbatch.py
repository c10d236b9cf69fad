"""``micro_batch_size=auto``: the largest micro batch that fits the device.

The micro batch is a memory setting, not a variable of the study: the effective batch (the
variable) and the order of the sequences stay as configured, and only the split between micro
batch and gradient accumulation changes. On a GPU the search tries real training steps of the
run's model at its seq_len, from the whole per-device batch down, backing off on out-of-memory
(Lightning's BatchSizeFinder does the same in its "power" and "binsearch" modes), restricted to
divisors of the per-device batch so the accumulation is exact. On a CPU the whole per-device batch
is taken: host memory is rarely the limit there, and a trial that swaps would be the wrong test.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from batchsize_study.batch import AUTO, BatchPlan, per_device_batch, plan_batch
from batchsize_study.config import Config, ModelConfig
from batchsize_study.errors import ConfigError

log = logging.getLogger("batchsize_study")

Trial = Callable[[int], None]
"""Runs a training step at a micro batch of that many sequences; raises on out-of-memory."""

_OOM_MESSAGES = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_SUPPORTED",  # cuDNN's answer when its workspace cannot be allocated
    "can't allocate memory",  # PyTorch's CPU allocator
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means 'this micro batch does not fit' (every other error propagates)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending: the micro batches that split it without a remainder."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class MicroBatchSearch:
    micro_batch_size: int
    """The largest divisor of the per-device batch whose trial fitted."""
    per_device: int
    tried: tuple[tuple[int, bool], ...]
    """(micro batch, fitted) in the order tried."""

    def as_record(self) -> dict[str, Any]:
        return {
            "per_device_batch": self.per_device,
            "tried": [list(t) for t in self.tried],
        }


def free_device_memory() -> None:
    """Between trials: drop the failed step's tensors and hand cached blocks back, so the next
    trial starts from the memory a fresh run would have."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_micro_batch(
    per_device: int, trial: Trial, free: Callable[[], None] = free_device_memory
) -> MicroBatchSearch:
    """The largest divisor of ``per_device`` for which ``trial`` does not run out of memory.

    First halving (to the largest divisor at most half the last failure) from ``per_device``
    until a trial fits, then a binary search among the divisors between that fit and the
    smallest failure: O(log) trials, and the answer is the largest fitting divisor whenever
    memory grows with the micro batch. Raises ConfigError when even 1 does not fit.
    """
    divs = divisors(per_device)
    tried: list[tuple[int, bool]] = []

    def fits(micro: int) -> bool:
        ok = True
        try:
            trial(micro)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
            if not is_oom(exc):
                raise
            ok = False
        # Outside the except block: the exception and its frames (holding the step's tensors)
        # are gone before the cache is emptied.
        free()
        tried.append((micro, ok))
        log.info("micro_batch_size=auto: %d sequences %s", micro, "fit" if ok else "do not fit")
        return ok

    micro, failed = per_device, None
    while not fits(micro):
        failed = micro
        smaller = [d for d in divs if d <= micro // 2]
        if not smaller:
            raise ConfigError(
                "micro_batch_size",
                AUTO,
                "not even one sequence fits this device's memory; use a smaller model, a shorter "
                "model.seq_len, or precision=bf16-mixed/16-mixed",
            )
        micro = smaller[-1]
    if failed is not None:
        between = [d for d in divs if micro < d < failed]
        while between:
            mid = between[len(between) // 2]
            if fits(mid):
                micro = mid
                between = [d for d in between if d > mid]
            else:
                between = [d for d in between if d < mid]
    return MicroBatchSearch(micro, per_device, tuple(tried))


# ---------------------------------------------------------------- the trial on the device


_AUTOCAST = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16}
_PARAM_DTYPE = {
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
    "64-true": torch.float64,
    "64": torch.float64,
}


class StepTrial:
    """Training steps of the run's model at a micro batch: weights, gradients, AdamW's two
    moments and the activations of one forward+backward at ``seq_len``, in the run's precision:
    the memory a training step needs (Lightning's BatchSizeFinder runs 3 steps per trial; 2 reach
    the steady state here, as AdamW's moments exist from the first)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        vocab_size: int,
        precision: str,
        device: torch.device,
        steps: int = 2,
    ) -> None:
        from batchsize_study.model import build_model

        self.device, self.vocab_size, self.steps = device, vocab_size, steps
        self.seq_len = model_cfg.seq_len
        self.autocast = _AUTOCAST.get(str(precision))
        dtype = _PARAM_DTYPE.get(str(precision), torch.float32)
        # Its own generator: the trial leaves the run's seeded random streams as they were.
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            self.model: torch.nn.Module | None = build_model(model_cfg, vocab_size).to(
                device=device, dtype=dtype
            )
        fused = device.type == "cuda"
        self.opt: torch.optim.Optimizer | None = torch.optim.AdamW(
            self.model.parameters(), lr=0.0, fused=fused or None
        )
        self.gen = torch.Generator(device=device).manual_seed(0)

    def __call__(self, micro: int) -> None:
        assert self.model is not None and self.opt is not None, "trial used after close()"
        batch = torch.randint(
            0,
            self.vocab_size,
            (micro, self.seq_len + 1),
            device=self.device,
            generator=self.gen,
        )
        inputs, targets = batch[:, :-1], batch[:, 1:]
        try:
            for _ in range(self.steps):
                with torch.autocast(
                    self.device.type, dtype=self.autocast, enabled=self.autocast is not None
                ):
                    logits = self.model(input_ids=inputs).logits
                # As CausalLMModule.loss: the cross-entropy on fp32 logits.
                loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)
                )
                del logits
                loss.backward()
                del loss
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # an asynchronous failure surfaces here
        finally:
            self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Release the trial's model and optimizer state before the run builds its own."""
        self.model = self.opt = None
        free_device_memory()


def _first_cuda_index(devices: Any) -> int:
    """The CUDA device a single-device run trains on, from ``trainer.devices``: an explicit list
    or "i," names it; a count (1, "1", "auto") means the first visible one."""
    if isinstance(devices, (list, tuple)) and devices:
        return int(devices[0])
    if isinstance(devices, str) and "," in devices:
        return int(next(d for d in devices.split(",") if d.strip()))
    return 0


def device_trial(c: Config, vocab_size: int, precision: str) -> StepTrial | None:
    """The trial for this run's device: real steps on the CUDA device it trains on, None on a CPU
    (take the whole per-device batch). Tests replace it to simulate a device's memory limit."""
    from batchsize_study.runtime import uses_cuda

    if not uses_cuda(c.trainer.get("accelerator")):
        return None
    device = torch.device("cuda", _first_cuda_index(c.trainer.get("devices", "auto")))
    return StepTrial(c.model, vocab_size, precision, device)


def check_setting(c: Config, world: int) -> None:
    """Before the corpus is prepared: refuse ``auto`` where the search cannot give one answer.

    The search runs on one GPU before Lightning starts its processes: with several, each rank
    would search on its own and could pick a different accumulation (a hang at the first
    all-reduce). Lightning's BatchSizeFinder refuses distributed strategies for the same reason.
    """
    from batchsize_study.runtime import uses_cuda

    if c.micro_batch_size == AUTO and world > 1 and uses_cuda(c.trainer.get("accelerator")):
        per_device = per_device_batch(c.batch_size, world)
        raise ConfigError(
            "micro_batch_size",
            AUTO,
            f"the search runs on one GPU, not {world}; give a divisor of the per-device batch "
            f"{per_device} (batch_size / devices), e.g. micro_batch_size={per_device}",
        )


def resolve_micro_batch(
    c: Config, plan: BatchPlan, vocab_size: int, precision: str, derivation: dict[str, Any]
) -> tuple[Config, BatchPlan]:
    """The run's config and batch plan with ``micro_batch_size=auto`` replaced by a number.

    The effective batch, world size and data order are unchanged (the sampler orders sequences,
    not micro batches); the accumulation follows. ``derivation`` (the record's) gets the
    setting, the resolved micro batch and the search's trials. Other settings pass unchanged.
    """
    if c.micro_batch_size != AUTO:
        return c, plan
    per_device = per_device_batch(c.batch_size, plan.world_size)
    trial = device_trial(c, vocab_size, precision)
    if trial is None:
        micro, how = per_device, {"per_device_batch": per_device, "device": "cpu"}
    else:
        try:
            search = find_micro_batch(per_device, trial)
        finally:
            close = getattr(trial, "close", None)
            if callable(close):
                close()
        micro, how = search.micro_batch_size, search.as_record()
    new_plan = plan_batch(c.batch_size, micro, plan.world_size, plan.seq_len, plan.max_steps)
    derivation.update(micro_batch_size_setting=AUTO, micro_batch_size=micro, micro_batch_search=how)
    log.info(
        "micro_batch_size=auto: %d of the per-device batch %d (accumulation %d)",
        micro,
        per_device,
        new_plan.accumulate_grad_batches,
    )
    return dataclasses.replace(c, micro_batch_size=micro), new_plan
