"""What the benchmarks share: the real config, a bare PyTorch training loop, the package's run,
and robust statistics.

The bare loop is the reference the package is measured against: the same model class
(``model.build_model``), the same AdamW groups, the same LR schedule, the same clipping, the
same autocast, the same host allocator setting and the same sampler order over the same token
file, with nothing else: no Lightning, no callbacks, no loggers, no progress bar.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from batchsize_study.config import Config, register_schema, validate

# The package is imported as installed (`pip install -e .` from this checkout): no sys.path edits.
REPO = Path(__file__).resolve().parents[1]

CONF = REPO / "conf"


def compose(*overrides: str) -> Config:
    """The typed config exactly as ``python -m batchsize_study <overrides>`` would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return validate(cfg)


def resolved_micro_batch(c: Config, device: torch.device | None = None) -> Config:
    """``c`` with ``micro_batch_size=auto`` (the GPU presets) replaced by the number the package's
    own run resolves it to on this device (batchsize_study/microbatch.py), so a bare loop trains
    the same split; a number passes unchanged."""
    from batchsize_study.batch import plan_batch
    from batchsize_study.data import prepare_corpus
    from batchsize_study.microbatch import resolve_micro_batch
    from batchsize_study.runtime import resolve_precision

    if c.micro_batch_size != "auto":
        return c
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = prepare_corpus(c.data, c.model.seq_len).vocab_size
    precision = resolve_precision(c.precision, "gpu" if dev.type == "cuda" else "cpu")
    plan = plan_batch(c.batch_size, c.micro_batch_size, 1, c.model.seq_len, c.max_steps)
    return resolve_micro_batch(c, plan, vocab, precision, {})[0]


def quiet_environment() -> None:
    """Offline wandb, no hub access: benchmarks never touch the network."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@dataclass
class Timing:
    """Tokens/s over the measured steps (after ``warmup`` steps), and the run's start-up cost."""

    tokens_per_second: float
    seconds: float
    steps: int
    startup_s: float = 0.0
    cpu_tokens_per_second: float = 0.0
    """Tokens per second of this process's CPU time: much less sensitive than wall time to other
    processes sharing the cores, so a cross-check of the wall-clock ratio on a busy machine."""
    extra: dict[str, Any] | None = None


def autocast_for(precision: str, device: torch.device):  # noqa: ANN201 - a context manager
    """The autocast Lightning's MixedPrecision plugin wraps the training step in."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def bare_stepper(
    c: Config,
    device: str | None = None,
    ckpt_dir: str | None = None,
    validate: bool = False,
    sync_steps: Collection[int] | None = None,
    noise: bool = False,
) -> Iterator[int]:
    """The bare loop as a generator: yields the tokens of each optimizer step once it is done
    (after a device sync), for ``c.max_steps`` steps. Setup runs on the first ``next``.

    With ``validate``, the first ``data.val_max_windows`` validation windows are evaluated every
    ``val_every_steps`` and after the last step (as the package does); with ``ckpt_dir``, model,
    optimizer and schedule are saved every ``checkpoint_every_steps`` (one ``torch.save``, as
    nanoGPT does). Both run after the step's yield, where Lightning runs them (after the
    step-end callbacks), so the interval between the yields of steps a and b holds the
    validations and checkpoints of steps a .. b-1, as the package's interval does.
    ``sync_steps``: the steps after which the device is synchronised before yielding (None: every
    step); a timer that reads the clock only at those steps lets the host run ahead elsewhere.
    ``noise``: the noise scale's arithmetic too, without the package's machinery: where the
    package splits a step (one micro-batch, one device: every ``noise.split_every``-th step) the
    backward runs in ``noise.split`` pieces, and on every step that holds two batch sizes each
    piece's or micro-batch's squared gradient norm is summed by a hook per parameter and the two
    EMAs are updated, as ``noise.NoiseScaleCallback`` does.
    """
    from batchsize_study.batch import plan_batch
    from batchsize_study.data import SeededWindowSampler, TokenWindows, prepare_corpus
    from batchsize_study.model import build_model, param_groups
    from batchsize_study.noise import splits_step
    from batchsize_study.runtime import resolve_precision, tune_host_allocator
    from batchsize_study.schedule import build_scheduler

    steps = c.max_steps
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    corpus = prepare_corpus(c.data, c.model.seq_len)
    precision = resolve_precision(c.precision, "gpu" if dev.type == "cuda" else "cpu")
    c = resolved_micro_batch(c, dev)
    plan = plan_batch(c.batch_size, c.micro_batch_size, 1, c.model.seq_len, steps)
    torch.manual_seed(c.seed)
    model = build_model(c.model, corpus.vocab_size).to(dev)
    model.train()
    forward = torch.compile(model) if c.compile else model
    o = c.optim
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=c.lr if c.lr is not None else 1e-3,
        betas=tuple(o.betas),
        eps=o.eps,
        fused=(dev.type == "cuda") or None,
    )
    s = c.schedule
    sched = build_scheduler(
        opt,
        warmup_steps=c.warmup_steps,
        max_steps=steps,
        warmup_shape=s.warmup_shape,
        decay=s.decay,
        min_lr_ratio=s.min_lr_ratio,
    )
    # The package's allocator setting too: the comparison is of the loops, not of malloc.
    tune_host_allocator(c.host_allocator, "gpu" if dev.type == "cuda" else "cpu")
    ds = TokenWindows(corpus.train_path, corpus.dtype, c.model.seq_len)
    accum = plan.accumulate_grad_batches
    sampler = SeededWindowSampler(len(ds), c.seed, steps * accum * c.micro_batch_size)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=c.micro_batch_size,
        sampler=sampler,
        drop_last=True,
        pin_memory=dev.type == "cuda",
    )
    max_norm = o.grad_clip if o.grad_clip is not None else float("inf")
    val = TokenWindows(corpus.val_path, corpus.dtype, c.model.seq_len, c.data.val_max_windows)
    val_loader = torch.utils.data.DataLoader(val, batch_size=c.micro_batch_size)
    batches = iter(loader)
    n = c.noise
    noise = noise and n.enabled
    can_split = noise and n.split > 1 and accum == 1 and c.micro_batch_size % n.split == 0
    measuring = False
    sq = torch.zeros((), device=dev)
    emas = torch.zeros(2, device=dev)

    def on_grad(grad: torch.Tensor) -> None:
        if measuring:
            sq.add_(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square())

    if noise:
        for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
            p.register_hook(on_grad)
    for step in range(1, steps + 1):
        pieces = n.split if can_split and splits_step(step - 1, n.split_every) else 1
        measuring = noise and accum * pieces > 1
        for _ in range(accum):
            batch = next(batches).to(dev, non_blocking=True)
            for part in batch.chunk(pieces):
                with autocast_for(precision, dev):
                    logits = forward(input_ids=part[:, :-1]).logits
                    loss = F.cross_entropy(
                        logits.float().reshape(-1, logits.size(-1)), part[:, 1:].reshape(-1)
                    )
                (loss / (accum * pieces)).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if measuring:  # mean |g_small|^2 and |g_big|^2 into their EMAs (noise.py)
            both = torch.stack([sq * accum * pieces, norm.float().square()])
            emas.mul_(n.ema).add_((1 - n.ema) * both)
            sq.zero_()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if sync_steps is None or step in sync_steps:
            _sync(dev)
        yield plan.tokens_per_step
        # After the yield, as Lightning runs validation and checkpoints after its step-end hooks:
        # a window timed from one yield to another holds the events of the same steps as the
        # package's window timed between two on_train_batch_end calls.
        if validate and (step % c.val_every_steps == 0 or step == steps):
            _validate(model, forward, val_loader, precision, dev)
        if ckpt_dir and step % c.checkpoint_every_steps == 0:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step}
            torch.save({**state, "sched": sched.state_dict()}, Path(ckpt_dir) / "last.pt")


def _validate(model, forward, loader, precision: str, dev: torch.device) -> float:  # noqa: ANN001
    """Mean validation loss over the loader's windows (weighted by windows)."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(dev)
            with autocast_for(precision, dev):
                logits = forward(input_ids=batch[:, :-1]).logits
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
                )
            total, n = total + float(loss) * batch.size(0), n + batch.size(0)
    model.train()
    return total / max(n, 1)


def bare_train(c: Config, warmup: int, device: str | None = None) -> Timing:
    """Train ``c.max_steps`` optimizer steps with the bare loop; time the steps after ``warmup``."""
    t0 = time.perf_counter()
    tokens = 0
    t_start = cpu_start = 0.0
    for step, n in enumerate(bare_stepper(c, device), start=1):
        if step == warmup:
            t_start, cpu_start = time.perf_counter(), time.process_time()
        elif step > warmup:
            tokens += n
    seconds = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    return Timing(tokens / seconds, seconds, c.max_steps, t_start - t0, tokens / cpu)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def fresh_study_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=f"bench-{prefix}-")


def median_spread(xs: list[float]) -> str:
    """'median (min..max, n=k)': the median is what we compare; the range shows the noise."""
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}..{max(xs):,.0f}, n={len(xs)})"


def rel_spread(xs: list[float]) -> float:
    """(max - min) / median: the noise of a set of rounds, as a fraction."""
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m else float("nan")
