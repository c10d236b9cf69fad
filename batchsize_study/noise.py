"""The simple gradient noise scale, measured from gradients the run already computes.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training") predict the critical batch
size from B_simple = tr(Sigma) / |G|^2: the per-example gradient variance over the squared true
gradient. Their appendix A.1 estimates both from squared gradient norms at two batch sizes:

    |G|^2    ~  (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(Sigma) ~  (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big)

Here B_small is one micro-batch on one rank (its gradient is the contribution of that micro-batch,
read by a hook on each parameter as autograd delivers it, before it is summed into ``.grad``: no
copy, no second backward) and B_big is the whole optimizer step (the accumulated, all-reduced
gradient whose norm the module already measures when it clips). Both estimates are linear in the
two squared norms, so their EMAs are kept apart and divided only when read (a ratio of EMAs, as
the paper recommends; an EMA of ratios is biased by the noisy denominator). Everything stays on
the device; the host sees it when the StepRecorder flushes its rows (``on_step_rows``), right after
the recorder's own transfer has drained the stream.

With one micro-batch per step on one device there is only one batch size and no estimate. Then
the module runs the backward of every ``noise.split_every``-th step in ``noise.split`` pieces
inside its training step (:func:`backward_in_pieces`): the same sequences, the same summed
gradient up to rounding, and Lightning still sees one micro-batch (no extra loop iteration,
data-loader fetch or callback round per piece). Only those steps are measured; the hooks idle on
the others.

Why the estimate stays unbiased when only some steps are measured: on a measured step the pieces'
squared norms are, exactly as on every step before, unbiased estimates of E|g_B|^2 at B_small and
B_big for that step's parameters (A.2-A.3 need nothing else). Which steps are measured is fixed by
the step index alone, before the data are drawn, so the selection cannot correlate with the
noise: the EMAs and the run totals average the same unbiased quantities over fewer steps. The
price is variance (1/split_every as many samples), and the EMA's window counts measured steps:
``split_every / (1 - ema)`` optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from batchsize_study.stats import t_quantile

BLOCKS = 10
"""Contiguous blocks of the run whose sums give the noise scale's jackknife interval."""


def noise_micro_batch(micro_batch_size: int, accumulation: int, world_size: int, split: int) -> int:
    """The size of the pieces a step's gradient is measured in, so that a step holds two batch
    sizes.

    Unchanged when the step already has several micro-batches (accumulation > 1) or several
    ranks; otherwise ``micro_batch_size // split`` when that divides exactly (the module then
    splits every ``noise.split_every``-th step, :func:`backward_in_pieces`), else unchanged (and
    the run records no noise scale).
    """
    if accumulation > 1 or world_size > 1 or split <= 1:
        return micro_batch_size
    if micro_batch_size % split or micro_batch_size // split < 1:
        return micro_batch_size
    return micro_batch_size // split


def splits_step(step: int, every: int) -> bool:
    """Whether optimizer step ``step`` (``trainer.global_step`` before its update) runs split:
    every ``every``-th step, from the first. Fixed by the index alone (see the module docstring)."""
    return every >= 1 and step % every == 0


def backward_in_pieces(
    module: pl.LightningModule,
    batch: torch.Tensor,
    pieces: int,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The training step's loss with the backward of all but the last piece already done.

    The batch is cut into ``pieces`` equal parts; each part's mean loss, divided by ``pieces``,
    is back-propagated through the strategy (so precision scaling and the ``on_*_backward`` hooks
    run per piece, as for Lightning's own accumulation). The returned tensor's value is the whole
    batch's mean loss (what the recorder logs); its gradient is the last piece's only, which
    Lightning back-propagates. The summed gradient equals the unsplit one up to rounding, provided
    the caller skips Lightning's zero_grad for this step (which runs after the training step).
    """
    if pieces <= 1 or batch.size(0) % pieces:
        return loss_fn(batch)
    parts = batch.chunk(pieces)
    optimizer = module.trainer.optimizers[0]
    # Lightning zeroes the gradients between the training step and its backward; the caller must
    # skip that zeroing for this step (CausalLMModule.optimizer_zero_grad), so zero here, first.
    optimizer.zero_grad(set_to_none=True)
    done = torch.zeros((), device=batch.device)
    for part in parts[:-1]:
        loss = loss_fn(part) / pieces
        with torch.autocast(batch.device.type, enabled=False):  # backward outside autocast
            module.trainer.strategy.backward(loss, optimizer)
        done = done + loss.detach()
    return loss_fn(parts[-1]) / pieces + done


def simple_noise_scale(
    g_small_sq: float, g_big_sq: float, b_small: float, b_big: float
) -> tuple[float, float, float]:
    """(|G|^2, tr(Sigma), B_simple) from mean squared gradient norms at two batch sizes.

    Unbiased estimators of McCandlish et al. 2018, appendix A.1 (eqs. A.2-A.3). B_simple is NaN
    when the |G|^2 estimate is not positive (noise dominates: more steps are needed).
    """
    if b_big <= b_small:
        raise ValueError(f"b_big={b_big} must exceed b_small={b_small}")
    # |G|^2 = (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)  (McCandlish A.2)
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    # tr(Sigma) = (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big)  (McCandlish A.3)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    b_simple = trace / g2 if g2 > 0 else math.nan
    return g2, trace, b_simple


class NoiseScaleCallback(pl.Callback):
    """Keeps device-side EMAs of |g_small|^2 and |g_big|^2 per optimizer step.

    ``b_small``: sequences in one micro-batch (or piece) on one rank; ``b_big``: the effective
    batch. ``ema``: EMA factor (bias-corrected). ``split_every``: the module splits only every
    this many steps (:func:`splits_step`); only those are measured and the hooks idle on the
    others. None: every step holds two batch sizes (accumulation or several ranks).
    A step whose squared norms are not finite (e.g. an fp16 overflow the scaler skips) is not
    measured: it changes neither the EMAs and totals nor the step count their bias correction and
    means divide by. Results: :attr:`summary` after training.
    """

    def __init__(
        self, b_small: int, b_big: int, ema: float = 0.95, split_every: int | None = None
    ) -> None:
        if b_big <= b_small:
            raise ValueError(f"no two batch sizes: b_small={b_small}, b_big={b_big}")
        self.b_small, self.b_big, self.ema = b_small, b_big, ema
        self.split_every = split_every
        self._active = True  # whether this step is measured (hooks on)
        self._handles: list[Any] = []
        self._micro_sq: torch.Tensor | None = None  # sum over this step's micro-batches
        self._n_micro = 0
        self._small: torch.Tensor | None = None  # EMA of mean |g_small|^2 (this rank)
        self._big: torch.Tensor | None = None  # EMA of |g_big|^2
        self._sum_small: torch.Tensor | None = None  # run totals, for the whole-run estimate
        self._sum_big: torch.Tensor | None = None
        # Steps that reached the update (host: whether there is anything to read, no sync) and,
        # on the device, those of them that were measured (finite): the bias correction and the
        # run means count only the latter, so a skipped step changes nothing.
        self._steps = 0
        self._measured: torch.Tensor | None = None
        self._blocks: torch.Tensor | None = None  # (BLOCKS, 3): sum small, sum big, steps
        self._max_steps = 1
        self.block_sums: list[list[float]] = []
        self._last_step = -1
        self.latest: dict[str, float] = {}
        self.run_mean: dict[str, float] = {}
        self._restored: dict[str, Any] | None = None

    # ------------------------------------------------------------- hooks on the gradients

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dev = pl_module.device
        saved = self._restored or {}
        self._restored = None

        def scalar(key: str) -> torch.Tensor:
            return torch.tensor(float(saved.get(key, 0.0)), device=dev, dtype=torch.float32)

        self._micro_sq = scalar("")
        # A resumed run continues the EMAs and totals of the checkpoint (load_state_dict).
        self._small, self._big = scalar("small"), scalar("big")
        self._sum_small, self._sum_big = scalar("sum_small"), scalar("sum_big")
        self._steps = int(saved.get("steps", 0))
        self._measured = scalar("steps")
        self._blocks = torch.tensor(
            saved.get("blocks", [[0.0, 0.0, 0.0]] * BLOCKS), device=dev, dtype=torch.float32
        )
        self._max_steps = max(1, int(trainer.max_steps or 1))
        self._last_step = trainer.global_step
        seen: set[int] = set()
        for p in pl_module.parameters():
            if p.requires_grad and id(p) not in seen:  # tied weights: one hook, summed gradient
                seen.add(id(p))
                self._handles.append(p.register_hook(self._on_grad))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.split_every is not None:
            self._active = splits_step(trainer.global_step, self.split_every)

    def _on_grad(self, grad: torch.Tensor) -> None:
        # The gradient of this micro-batch alone, before autograd adds it into .grad.
        if not self._active:
            return
        assert self._micro_sq is not None
        self._micro_sq.add_(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square())

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._n_micro += 1

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None)  # fp16 AMP: hooks saw scaled gradients
        if scale is not None and self._micro_sq is not None:
            self._micro_sq.div_(scale.float().square())

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # still accumulating
        self._last_step = trainer.global_step
        big_norm = pl_module.step_stats.grad_norm  # type: ignore[attr-defined]  (steps.py)
        assert self._micro_sq is not None and self._small is not None and self._big is not None
        n, self._n_micro = self._n_micro, 0
        micro_sq, self._micro_sq = self._micro_sq, torch.zeros_like(self._micro_sq)
        if big_norm is None or n == 0 or (n == 1 and trainer.world_size == 1):
            return  # not measured, or this step's gradient came in one piece: one batch size
        # Each of the n pieces' loss is divided by n (Lightning's accumulation, or the module's
        # split), so a piece's contribution is g_small / n: mean |g_small|^2 = micro_sq n^2 / n.
        small = micro_sq * n
        big = big_norm.float().square()
        ok = torch.isfinite(small) & torch.isfinite(big)  # a skipped step leaves the EMAs alone
        beta = self.ema
        self._small.copy_(torch.where(ok, beta * self._small + (1 - beta) * small, self._small))
        self._big.copy_(torch.where(ok, beta * self._big + (1 - beta) * big, self._big))
        assert self._sum_small is not None and self._sum_big is not None
        self._sum_small.add_(torch.where(ok, small, torch.zeros_like(small)))
        self._sum_big.add_(torch.where(ok, big, torch.zeros_like(big)))
        assert self._blocks is not None
        k = min(BLOCKS - 1, (trainer.global_step - 1) * BLOCKS // self._max_steps)
        row = torch.stack([small, big, torch.ones_like(small)])
        self._blocks[k].add_(torch.where(ok, row, torch.zeros_like(row)))
        assert self._measured is not None
        self._measured.add_(ok.float())
        self._steps += 1

    def state_dict(self) -> dict[str, Any]:
        """The EMAs and run totals as host floats: a resumed run's estimate continues, not
        restarts (checkpoints hold plain values and load with ``weights_only``)."""
        if self._small is None:
            return {}
        assert self._big is not None and self._sum_small is not None and self._sum_big is not None
        assert self._measured is not None
        return {
            "small": float(self._small),
            "big": float(self._big),
            "sum_small": float(self._sum_small),
            "sum_big": float(self._sum_big),
            "steps": round(float(self._measured)),  # measured steps: the EMAs' and sums' count
            "blocks": self._blocks.tolist() if self._blocks is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) or None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------- reading out

    def on_step_rows(
        self, trainer: pl.Trainer, rows: list[dict[str, float]], collective: bool = True
    ) -> dict[str, float]:
        """Called by the StepRecorder after its transfer; returns ``noise/`` metrics to log.
        Without ``collective`` (the exception path) the estimate is left as last read: the
        rank-mean would need an all-reduce the other ranks may never join."""
        if self._steps == 0 or self._small is None:
            return {}
        if not collective and trainer.world_size > 1:
            return {}
        assert self._big is not None and self._sum_small is not None and self._sum_big is not None
        assert self._blocks is not None and self._measured is not None
        values = torch.cat(
            [
                torch.stack(
                    [self._small, self._big, self._sum_small, self._sum_big, self._measured]
                ),
                self._blocks.flatten(),
            ]
        )
        if trainer.world_size > 1:
            # Per-rank micro-batch norms: the mean over ranks is the mean over all small batches
            # (EMAs are linear, so the mean of EMAs is the EMA of means).
            values = trainer.strategy.reduce(values, reduce_op="mean")
        host = values.tolist()
        small, big, sum_small, sum_big = host[:4]
        measured = round(host[4])  # finite steps only (every rank skips the same steps)
        self.block_sums = [host[5 + 3 * i : 8 + 3 * i] for i in range(BLOCKS)]
        if measured == 0:
            return {}  # every step so far was skipped: nothing measured, no estimate
        correction = 1.0 - self.ema**measured  # bias correction of a zero-started EMA
        g2, trace, b_simple = simple_noise_scale(
            small / correction, big / correction, self.b_small, self.b_big
        )
        self.latest = {"g2": g2, "trace": trace, "b_simple": b_simple, "step": self._last_step}
        g2m, tracem, bm = simple_noise_scale(
            sum_small / measured, sum_big / measured, self.b_small, self.b_big
        )
        self.run_mean = {"g2": g2m, "trace": tracem, "b_simple": bm, "steps": measured}
        out = {"noise/g2": g2, "noise/trace_sigma": trace, "noise/b_simple": b_simple}
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def summary(self) -> dict[str, Any]:
        """The record's ``noise`` entry (host floats, read after the last flush)."""
        return {
            "method": "McCandlish et al. 2018 B_simple, appendix A.1 estimators, ratio of EMAs",
            "b_small": self.b_small,
            "measured_every": self.split_every or 1,
            "b_big": self.b_big,
            "ema": self.ema,
            "final": _finite_or_none(self.latest),
            "run_mean": _finite_or_none(self.run_mean),
            **self._interval(),
        }

    def _interval(self) -> dict[str, Any]:
        iv = jackknife_interval(
            [tuple(b) for b in self.block_sums],
            self.b_small,
            self.b_big,  # type: ignore[misc]
        )
        if iv is None:
            return {"b_simple_interval": None}
        return {
            "b_simple_interval": [iv["low"], iv["high"]],
            "interval_method": (
                f"{iv['level']:.0%} delete-one-block jackknife of the run-mean log B_simple over "
                f"{iv['blocks']} contiguous blocks of steps (batch noise and drift over training)"
            ),
            "interval_of": "run_mean",
        }

    @property
    def gradient_noise_scale(self) -> float | None:
        """The final EMA estimate in sequences; None where |G|^2 was not resolved."""
        v = self.latest.get("b_simple")
        return v if v is not None and math.isfinite(v) and v > 0 else None


def jackknife_interval(
    blocks: list[tuple[float, float, float]], b_small: float, b_big: float, level: float = 0.95
) -> dict[str, Any] | None:
    """An interval for the run-mean B_simple from per-block sums (sum |g_small|^2, sum |g_big|^2,
    measured steps) of contiguous blocks of the run: the delete-one-block jackknife (Quenouille
    1956; Efron & Tibshirani 1993, ch. 11) of log B_simple, t interval with K - 1 df.

    Contiguous blocks carry both the batch-to-batch noise and the drift of B_simple as training
    proceeds (it grows as the loss falls), so the interval is wide where one number summarises a
    changing quantity. None with fewer than 3 blocks or where a leave-one-out estimate is not
    resolved (|G|^2 <= 0): then no interval is claimed.
    """
    used = [(s, b, n) for s, b, n in blocks if n > 0]
    k = len(used)
    if k < 3:
        return None
    tot_s, tot_b, tot_n = (sum(x[i] for x in used) for i in range(3))
    full = simple_noise_scale(tot_s / tot_n, tot_b / tot_n, b_small, b_big)[2]
    if not full > 0:
        return None
    logs = []
    for s, b, n in used:
        v = simple_noise_scale(
            (tot_s - s) / (tot_n - n), (tot_b - b) / (tot_n - n), b_small, b_big
        )[2]
        if not v > 0:
            return None
        logs.append(math.log(v))
    mean = sum(logs) / k
    se = math.sqrt((k - 1) / k * sum((x - mean) ** 2 for x in logs))
    half = t_quantile(level, k - 1) * se
    return {
        "b_simple": full,
        "low": full * math.exp(-half),
        "high": full * math.exp(half),
        "se_log": se,
        "blocks": k,
        "level": level,
    }


def _finite_or_none(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if isinstance(v, int) or math.isfinite(v) else None) for k, v in d.items()}
