"""Batch arithmetic: the variable under study, so it is derived in one place and refused loudly.

Effective batch = devices x nodes x micro batch x accumulation, always in sequences.
``micro_batch_size=auto`` plans with the whole per-device batch; training replaces that with the
largest micro batch that fits the device (batchsize_study/microbatch.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from batchsize_study.errors import ConfigError

AUTO = "auto"
"""``micro_batch_size=auto``: the largest micro batch that fits the device (microbatch.py)."""


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int
    micro_batch_size: int
    world_size: int
    accumulate_grad_batches: int
    seq_len: int
    max_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.max_steps

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d.update(tokens_per_step=self.tokens_per_step, total_tokens=self.total_tokens)
        return d

    def describe(self) -> str:
        return (
            f"effective batch {self.batch_size} sequences = {self.world_size} device(s) x "
            f"micro batch {self.micro_batch_size} x accumulation {self.accumulate_grad_batches}; "
            f"tokens per step {self.tokens_per_step:,}; total tokens {self.total_tokens:,} "
            f"over {self.max_steps} steps"
        )


def per_device_batch(batch_size: int, world_size: int) -> int:
    """Sequences each device takes per optimizer step; refuses a batch the devices cannot share
    equally (the one-line error of an impossible split)."""
    if batch_size % world_size != 0:
        lower = max(world_size, batch_size // world_size * world_size)
        raise ConfigError(
            "batch_size",
            batch_size,
            f"must be a multiple of {world_size} device(s) with micro_batch_size=auto; use "
            f"batch_size={lower} or {lower + world_size}",
        )
    return batch_size // world_size


def plan_batch(
    batch_size: int, micro_batch_size: int | str, world_size: int, seq_len: int, max_steps: int
) -> BatchPlan:
    """Derive gradient accumulation; refuse any split that does not divide exactly.

    ``micro_batch_size=auto`` plans one micro batch per device per step (the whole per-device
    batch): what a CPU run trains with, and where a GPU run's search starts.
    """
    if micro_batch_size == AUTO:
        micro_batch_size = per_device_batch(batch_size, world_size)
    if not isinstance(micro_batch_size, int):
        raise ConfigError("micro_batch_size", micro_batch_size, "use a positive number or auto")
    per_step = micro_batch_size * world_size
    if batch_size % per_step != 0:
        lower = max(per_step, batch_size // per_step * per_step)
        raise ConfigError(
            "batch_size",
            batch_size,
            f"must be a multiple of micro_batch_size={micro_batch_size} x {world_size} device(s) "
            f"= {per_step}; use batch_size={lower} or {lower + per_step}, or another micro_batch_size",
        )
    return BatchPlan(
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        world_size=world_size,
        accumulate_grad_batches=batch_size // per_step,
        seq_len=seq_len,
        max_steps=max_steps,
    )
