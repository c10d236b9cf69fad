"""Gradient noise scale: the estimators, the gradient hooks, and the record (incl. adam_sde)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from batchsize_study.experiments import run
from batchsize_study.noise import (
    NoiseScaleCallback,
    backward_in_pieces,
    noise_micro_batch,
    simple_noise_scale,
    splits_step,
)
from batchsize_study.steps import StepStats
from batchsize_study.study import adam_sde_hparams


def test_estimators_recover_known_gradient_and_noise():
    # Per-example gradients g_i = G + e_i with tr(Cov e) known: the appendix A.1 estimators,
    # averaged over many batches, recover |G|^2 and tr(Sigma) (McCandlish et al. 2018).
    gen = torch.Generator().manual_seed(0)
    dim, b_small, b_big, n_big = 50, 4, 32, 4000
    true_g = torch.randn(dim, generator=gen)
    sigma = 3.0  # per-coordinate std: tr(Sigma) = dim * sigma^2
    per_example = true_g + sigma * torch.randn(n_big, b_big, dim, generator=gen)
    big = per_example.mean(1)  # (n_big, dim)
    small = per_example.reshape(n_big, b_big // b_small, b_small, dim).mean(2)
    g_small_sq = small.square().sum(-1).mean().item()
    g_big_sq = big.square().sum(-1).mean().item()
    g2, trace, b_simple = simple_noise_scale(g_small_sq, g_big_sq, b_small, b_big)
    assert g2 == pytest.approx(true_g.square().sum().item(), rel=0.05)
    assert trace == pytest.approx(dim * sigma**2, rel=0.05)
    assert b_simple == pytest.approx(dim * sigma**2 / true_g.square().sum().item(), rel=0.08)
    # The naive |g_small|^2 is biased by tr(Sigma)/B_small: the estimator removes it.
    assert g_small_sq > 1.5 * g2


def test_no_two_batch_sizes_is_refused_and_unresolved_is_nan():
    with pytest.raises(ValueError):
        simple_noise_scale(1.0, 1.0, 8, 8)
    assert math.isnan(simple_noise_scale(10.0, 1.0, 1, 2)[2])  # |G|^2 estimate < 0


def test_micro_batch_split_only_when_a_step_has_one_batch_size():
    assert noise_micro_batch(16, 1, 1, 2) == 8
    assert noise_micro_batch(16, 2, 1, 2) == 16  # accumulation already gives two sizes
    assert noise_micro_batch(16, 1, 2, 2) == 16  # per-rank vs all-reduced
    assert noise_micro_batch(15, 1, 1, 2) == 15  # no exact split: no estimate
    assert noise_micro_batch(16, 1, 1, 1) == 16  # split off


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.last_grad_norm: torch.Tensor | None = None

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x), y)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):  # noqa: ANN001
        self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), math.inf)
        self.step_stats = StepStats(grad_norm=self.last_grad_norm)  # the contract (steps.py)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.0)  # frozen: gradients checkable afterwards


def test_hooks_measure_micro_and_step_gradients(tmp_path: Path):
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3 * torch.randn(16, 1)
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=4, shuffle=False)
    module = _Linear()
    cb = NoiseScaleCallback(b_small=4, b_big=8, ema=0.0)  # ema 0: the last step's values
    trainer = _fit(module, loader, cb, tmp_path, max_steps=2, accumulate_grad_batches=2)
    cb.on_step_rows(trainer, [])

    def grad(lo: int, hi: int) -> torch.Tensor:
        module.zero_grad()
        torch.nn.functional.mse_loss(module.lin(x[lo:hi]), y[lo:hi]).backward()
        return torch.cat([p.grad.flatten() for p in module.parameters()])

    ga, gb = grad(8, 12), grad(12, 16)  # the second step's two micro-batches
    small = (ga.square().sum() + gb.square().sum()).item() / 2
    big = ((ga + gb) / 2).square().sum().item()
    g2, trace, b_simple = simple_noise_scale(small, big, 4, 8)
    assert cb.latest["g2"] == pytest.approx(g2, rel=1e-4)
    assert cb.latest["trace"] == pytest.approx(trace, rel=1e-4)
    assert cb.latest["b_simple"] == pytest.approx(b_simple, rel=1e-4)
    assert not any(p.grad is None for p in module.parameters())
    assert cb._handles == []  # hooks removed at teardown


def test_adam_sde_rule_matches_malladi():
    # Malladi et al. 2022: batch x kappa -> (1 - beta) x kappa, eps / sqrt(kappa).
    betas, eps = adam_sde_hparams([0.9, 0.95], 1e-8, 4.0)
    assert betas == pytest.approx([0.6, 0.8])
    assert eps == pytest.approx(5e-9)
    assert adam_sde_hparams([0.9, 0.95], 1e-8, 1.0) == ([pytest.approx(0.9), 0.95], 1e-8)


def test_smoke_records_carry_noise_scale_and_adam_sde(cfg_factory, tmp_path: Path):
    """small_batch (accumulation 1: split) and large_batch with adam_sde, smoke-sized."""
    steps = ("max_steps=20", "warmup_steps=4", "val_every_steps=20")
    # Every step measured here (noise.split_every=1): 20 smoke steps resolve |G|^2; sparser
    # measurement is checked in test_split_backward_gives_the_unsplit_gradient_and_loss.
    small = run(cfg_factory("experiment=small_batch", "lr=0.01", "noise.split_every=1", *steps))
    assert small["status"] == "completed"
    # The micro batch stays 16 (one Lightning batch per step); the measured steps' backward runs
    # in two pieces of 8 inside the training step.
    assert small["micro_batch_size"] == 16 and small["accumulate_grad_batches"] == 1
    assert small["derivation"]["noise_split"] == {"micro_batch_size": 16, "split": 2, "every": 1}
    assert small["noise"]["measured_every"] == 1 and small["noise"]["run_mean"]["steps"] == 20
    gns = small["gradient_noise_scale"]
    assert gns is not None and math.isfinite(gns) and gns > 0
    assert small["noise"]["b_small"] == 8 and small["noise"]["b_big"] == 16
    assert small["adam_sde"] is None and small["adam_betas"] == [0.9, 0.95]
    large = run(
        cfg_factory("experiment=large_batch", "batch_size=32", "lr_scaling.adam_sde=true", *steps)
    )
    assert large["status"] == "completed"
    assert large["adam_sde"]["ratio"] == 2.0
    assert large["adam_betas"] == pytest.approx([0.8, 0.9])
    assert large["adam_eps"] == pytest.approx(1e-8 / math.sqrt(2))
    assert large["noise"]["b_small"] == 16 and large["noise"]["b_big"] == 32
    on_disk = json.loads(Path(large["metrics_csv"]).with_name("result.json").read_text())
    assert on_disk["adam_betas"] == large["adam_betas"]
    assert "gradient_noise_scale" in on_disk


class _SplitLinear(_Linear):
    """Splits every ``every``-th step's backward in two, as CausalLMModule does."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self.grads: dict[int, torch.Tensor] = {}
        self.losses: list[float] = []
        self.hold = False

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):  # noqa: ANN001, ANN201
        if self.hold:  # as CausalLMModule: keep the pieces already back-propagated
            self.hold = False
            return
        optimizer.zero_grad()

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.lin(batch[:, :3]), batch[:, 3:])

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        if splits_step(self.trainer.global_step, self.every):
            self.hold = True
            out = backward_in_pieces(self, batch, 2, self._loss)
        else:
            out = self._loss(batch)
        self.losses.append(float(out))
        return out

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):  # noqa: ANN001
        super().configure_gradient_clipping(optimizer)
        self.grads[self.trainer.global_step] = torch.cat(
            [p.grad.flatten().clone() for p in self.parameters()]
        )


def test_split_backward_gives_the_unsplit_gradient_and_loss(tmp_path: Path):
    """The pieces' summed gradient and the logged loss are the whole batch's (up to rounding),
    and the callback measures only the split steps, with the pieces' exact norms."""
    torch.manual_seed(0)
    data = torch.randn(24, 4)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    module = _SplitLinear(every=2)
    cb = NoiseScaleCallback(b_small=2, b_big=4, ema=0.0, split_every=2)
    trainer = _fit(module, loader, cb, tmp_path, max_steps=6)
    cb.on_step_rows(trainer, [])
    assert cb._steps == 3  # steps 0, 2, 4

    def grad(rows: torch.Tensor) -> torch.Tensor:
        module.zero_grad()
        module._loss(rows).backward()
        return torch.cat([p.grad.flatten() for p in module.parameters()])

    for step in range(6):
        batch = data[4 * step : 4 * step + 4]
        assert torch.allclose(module.grads[step], grad(batch), atol=1e-6)
        assert module.losses[step] == pytest.approx(float(module._loss(batch)), rel=1e-6)
    last = data[16:20]  # step 4, the last measured one
    ga, gb = grad(last[:2]), grad(last[2:])
    small = (ga.square().sum() + gb.square().sum()).item() / 2
    big = ((ga + gb) / 2).square().sum().item()
    g2, trace, _ = simple_noise_scale(small, big, 2, 4)
    assert cb.latest["g2"] == pytest.approx(g2, rel=1e-4)
    assert cb.latest["trace"] == pytest.approx(trace, rel=1e-4)


def test_split_steps_are_chosen_by_index_alone():
    assert [s for s in range(10) if splits_step(s, 4)] == [0, 4, 8]
    assert all(splits_step(s, 1) for s in range(5))


def test_jackknife_interval_covers_the_true_noise_scale_and_widens_with_noise():
    """Blocks drawn from G^2 = 1, tr(Sigma) = 100 (B_simple = 100) at B = 8 and 32: the interval
    holds 100; noisier blocks give a wider one; too few blocks give none."""
    import random

    from batchsize_study.noise import jackknife_interval

    def blocks(noise: float, seed: int) -> list[tuple[float, float, float]]:
        rng = random.Random(seed)
        out = []
        for _ in range(10):
            n = 20
            small = sum((1 + 100 / 8) * (1 + noise * rng.gauss(0, 1)) for _ in range(n))
            big = sum((1 + 100 / 32) * (1 + noise * rng.gauss(0, 1)) for _ in range(n))
            out.append((small, big, float(n)))
        return out

    quiet = jackknife_interval(blocks(0.05, 0), 8, 32)
    loud = jackknife_interval(blocks(0.2, 0), 8, 32)
    assert quiet is not None and loud is not None
    assert quiet["low"] < 100 < quiet["high"]
    assert (loud["high"] / loud["low"]) > (quiet["high"] / quiet["low"])
    assert jackknife_interval(blocks(0.05, 0)[:2], 8, 32) is None


def _fit(module, loader, cb, tmp_path, **trainer_args) -> pl.Trainer:  # noqa: ANN001
    """A bare Trainer (no logger, checkpoint or bar) that fits ``module`` with ``cb``."""
    trainer = pl.Trainer(
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **trainer_args,
    )
    trainer.fit(module, loader)
    return trainer


def _feed_steps(
    steps: dict[int, tuple[float, float]], ema: float = 0.9, max_steps: int = 20
) -> NoiseScaleCallback:
    """A callback fed (mean |g_small|^2, |g_big|^2) per optimizer step, two pieces per step, as
    on_train_batch_end sees them; then read once (on_step_rows)."""
    from types import SimpleNamespace

    cb = NoiseScaleCallback(b_small=2, b_big=8, ema=ema)
    module = SimpleNamespace(device=torch.device("cpu"), parameters=lambda: [], step_stats=None)
    trainer = SimpleNamespace(global_step=0, max_steps=max_steps, world_size=1)
    cb.on_train_start(trainer, module)
    for step, (small, big) in steps.items():
        trainer.global_step = step
        assert cb._micro_sq is not None
        cb._micro_sq.fill_(small / 2)  # two pieces: mean |g_small|^2 = micro_sq * 2
        cb._n_micro = 2
        module.step_stats = StepStats(grad_norm=torch.tensor(math.sqrt(big)))
        cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_step_rows(trainer, [])
    return cb


@pytest.mark.parametrize("bad", [(math.inf, 3.0), (5.0, math.inf), (math.nan, math.nan)])
def test_a_skipped_non_finite_step_changes_nothing(bad):
    # The same measured values with a non-finite step in between, and without it: the bias
    # correction and the run means count measured steps only, so every result is identical.
    clean = {1: (9.0, 3.0), 2: (8.0, 2.5), 4: (7.5, 2.0), 5: (8.5, 2.2)}
    skipped = _feed_steps(dict(sorted({**clean, 3: bad}.items())))  # step 3 between 2 and 4
    ref = _feed_steps(clean)
    assert ref.run_mean["steps"] == 4 and ref.latest["g2"] > 0
    assert skipped.latest == ref.latest
    assert skipped.run_mean == ref.run_mean
    assert skipped.block_sums == ref.block_sums
    assert skipped.state_dict() == ref.state_dict()
    assert skipped.summary() == ref.summary()
    # The numbers are the bias-corrected EMAs and means of the four measured steps.
    beta, vals = 0.9, list(clean.values())
    ema = [sum((1 - beta) * beta ** (3 - i) * v[j] for i, v in enumerate(vals)) for j in (0, 1)]
    want = simple_noise_scale(ema[0] / (1 - beta**4), ema[1] / (1 - beta**4), 2, 8)
    assert [ref.latest[k] for k in ("g2", "trace", "b_simple")] == pytest.approx(want, rel=1e-5)
    means = [sum(v[j] for v in vals) / 4 for j in (0, 1)]
    want = simple_noise_scale(means[0], means[1], 2, 8)
    assert [ref.run_mean[k] for k in ("g2", "trace", "b_simple")] == pytest.approx(want, rel=1e-5)


def test_only_skipped_steps_give_no_estimate_and_resume_keeps_the_measured_count():
    only_bad = _feed_steps({1: (math.inf, math.inf)})
    assert only_bad.latest == {} and only_bad.run_mean == {}
    assert only_bad.state_dict()["steps"] == 0
    # A resumed run continues from the measured count, not from the steps that reached the update.
    first = _feed_steps({1: (9.0, 3.0), 2: (math.inf, 1.0)})
    assert first.run_mean["steps"] == 1
    resumed = NoiseScaleCallback(b_small=2, b_big=8, ema=0.9)
    resumed.load_state_dict(first.state_dict())
    from types import SimpleNamespace

    module = SimpleNamespace(device=torch.device("cpu"), parameters=lambda: [])
    resumed.on_train_start(SimpleNamespace(global_step=2, max_steps=20, world_size=1), module)
    assert resumed._measured is not None and float(resumed._measured) == 1.0
