"""The LightningModule: a Hugging Face causal LM built from a config (no weights), CE loss,
AdamW with decay on matrices only, warmup + cosine stepped per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from batchsize_study.config import ModelConfig, OptimConfig, ScheduleConfig
from batchsize_study.noise import backward_in_pieces, splits_step
from batchsize_study.schedule import build_scheduler
from batchsize_study.steps import StepStats


@dataclass(frozen=True)
class ModuleSettings:
    """Everything :class:`CausalLMModule` is built from, in one object: a new knob is one field
    here instead of one more positional parameter at every construction site."""

    model: ModelConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    vocab_size: int
    peak_lr: float
    max_steps: int
    warmup_steps: int
    compile: bool = False
    noise_split: int = 1
    """The gradient noise scale (noise.py): every ``noise_split_every``-th step's backward runs
    in ``noise_split`` pieces, so that step holds two batch sizes."""
    noise_split_every: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain values only: what a checkpoint stores as the module's hyperparameters."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleSettings:
        """The inverse of :meth:`to_dict`; config objects given as such are kept."""
        d = dict(d)
        for key, kind in (
            ("model", ModelConfig),
            ("optim", OptimConfig),
            ("schedule", ScheduleConfig),
        ):
            if key in d and not isinstance(d[key], kind):
                d[key] = kind(**d[key])
        return cls(**d)

    @classmethod
    def from_legacy(cls, hp: Mapping[str, Any]) -> ModuleSettings:
        """Settings from the flat keyword form of checkpoints written before ModuleSettings
        (``model_cfg=..., optim_cfg=..., schedule_cfg=..., vocab_size=..., ...``)."""
        d = {_LEGACY_NAMES.get(k, k): v for k, v in hp.items()}
        unknown = set(d) - _FIELDS
        if unknown:
            raise TypeError(f"CausalLMModule got unexpected argument(s) {sorted(unknown)}")
        return cls.from_dict(d)


# The old keyword names of CausalLMModule.__init__ that ModuleSettings renamed.
_LEGACY_NAMES = {"model_cfg": "model", "optim_cfg": "optim", "schedule_cfg": "schedule"}
_FIELDS = set(ModuleSettings.__dataclass_fields__)


def build_hf_config(cfg: ModelConfig, vocab_size: int) -> PretrainedConfig:
    """Map our few architecture knobs onto the named Hugging Face config class."""
    common = dict(vocab_size=vocab_size, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.arch == "gpt2":
        kw = dict(
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_positions=cfg.seq_len,
            n_inner=cfg.intermediate_size,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=None,
            eos_token_id=None,
        )
    else:
        kw = dict(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size or _swiglu_width(cfg.hidden_size),
            max_position_embeddings=cfg.seq_len,
            attention_dropout=cfg.dropout,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
    kw.update(common)
    kw.update(dict(cfg.extra))
    return AutoConfig.for_model(cfg.arch, **kw)


def _swiglu_width(hidden: int) -> int:
    # 8/3 * d rounded up to a multiple of 64: keeps SwiGLU's parameter count equal to a 4d MLP
    # (Shazeer 2020, "GLU Variants Improve Transformer").
    return int(math.ceil(8 * hidden / 3 / 64) * 64)


def build_model(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """The architecture from its config, randomly initialised (no weights are downloaded)."""
    hf_cfg = build_hf_config(cfg, vocab_size)
    return AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=cfg.attn_implementation)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: not norms, biases or embeddings (tied heads count as embeddings)."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embed_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class CausalLMModule(pl.LightningModule):
    """Trains one causal LM. Per-step metrics are gathered by the StepRecorder callback from
    :attr:`step_stats` (see :mod:`batchsize_study.steps`) and the training-step outputs, so the hot
    path has no host sync."""

    def __init__(
        self, settings: ModuleSettings | Mapping[str, Any] | None = None, **legacy: Any
    ) -> None:
        """``settings``: a ModuleSettings, or its dict (how a checkpoint stores it).

        ``**legacy`` only exists so ``load_from_checkpoint`` still loads checkpoints written
        before ModuleSettings: Lightning passes their saved flat hyperparameters
        (``model_cfg=..., optim_cfg=..., ...``) as keywords. New code passes ``settings``.
        """
        super().__init__()
        if settings is None:
            if not legacy:
                raise TypeError("CausalLMModule needs settings (a ModuleSettings)")
            settings = ModuleSettings.from_legacy(legacy)
        elif legacy:
            raise TypeError(
                f"CausalLMModule takes settings or the old keywords, not both: {legacy}"
            )
        elif not isinstance(settings, ModuleSettings):
            settings = ModuleSettings.from_dict(settings)
        self.settings = settings
        self.save_hyperparameters({"settings": settings.to_dict()})
        self._grads_hold_pieces = False
        self.model = build_model(settings.model, settings.vocab_size)
        self._forward = torch.compile(self.model) if settings.compile else self.model
        # Per-window losses' mean and mean square (synced across ranks by torchmetrics): the
        # validation loss and the standard error of its mean over the windows.
        self.val_loss = MeanMetric()
        self.val_sq = MeanMetric()
        self.val_windows = SumMetric()
        self.step_stats = StepStats()
        self.last_val: dict[str, float] = {}

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def window_losses(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of each window (fp32): one number per sequence."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self._forward(input_ids=inputs).logits.float()
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
        )
        return per_token.view(targets.shape).mean(dim=1)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the window (computed here on the logits, in fp32)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self._forward(input_ids=inputs).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        split, every = self.settings.noise_split, self.settings.noise_split_every
        if split > 1 and splits_step(self.trainer.global_step, every):
            self._grads_hold_pieces = True
            return backward_in_pieces(self, batch, split, self.loss)
        return self.loss(batch)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:  # noqa: ANN001
        # Lightning zeroes between training_step and backward: a split step's first pieces are
        # already in .grad (backward_in_pieces zeroed before them) and must stay.
        if self._grads_hold_pieces:
            self._grads_hold_pieces = False
            return
        optimizer.zero_grad()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        per_window = self.window_losses(batch)
        self.val_loss.update(per_window)
        self.val_sq.update(per_window.square())
        self.val_windows.update(torch.tensor(float(per_window.numel()), device=per_window.device))

    def on_validation_epoch_end(self) -> None:
        val = float(self.val_loss.compute())
        sq, n = float(self.val_sq.compute()), float(self.val_windows.compute())
        for m in (self.val_loss, self.val_sq, self.val_windows):
            m.reset()
        # Standard error of the mean over n windows: sqrt(sample variance / n).
        var = max(sq - val * val, 0.0) * n / (n - 1) if n > 1 else math.nan
        self.last_val = {
            "val/loss": val,
            "val/ppl": math.exp(min(val, 50.0)),
            "val/loss_se": math.sqrt(var / n) if n > 1 else math.nan,
        }
        self.log_dict(self.last_val, prog_bar=True, logger=False, sync_dist=False)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:  # noqa: ANN001
        # One fused pass both measures and clips the global norm; the norm stays on the device.
        clip = self.settings.optim.grad_clip
        max_norm = clip if clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm).detach()
        self.step_stats = StepStats(lr=optimizer.param_groups[0]["lr"], grad_norm=norm)

    def configure_optimizers(self) -> dict:
        o, s = self.settings.optim, self.settings.schedule
        fused = torch.cuda.is_available() and next(self.parameters()).is_cuda
        opt = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay),
            lr=self.settings.peak_lr,
            betas=tuple(o.betas),
            eps=o.eps,
            fused=fused or None,
        )
        sched = build_scheduler(
            opt,
            warmup_steps=self.settings.warmup_steps,
            max_steps=self.settings.max_steps,
            warmup_shape=s.warmup_shape,
            decay=s.decay,
            min_lr_ratio=s.min_lr_ratio,
        )
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1},
        }
