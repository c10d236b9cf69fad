"""The config schema: typed dataclasses that Hydra merges the YAML files into.

OmegaConf checks types when the files and the command line are merged (``batch_size=abc`` fails
there, naming the key); :func:`validate` checks ranges and cross-key rules before any work, so a
wrong value costs the user one line and no compute. Modules below the experiment layer receive
these dataclasses (or plain values), never a ``DictConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from batchsize_study.errors import ConfigError

TASKS = (
    "superconvergence",
    "small_batch",
    "large_batch",
    "compare",
    "stability_probe",
    "lr_sweep",
)


@dataclass
class StudyConfig:
    name: str = "default"
    """The study: every run of one study shares a wandb group and a records folder."""
    dir: str = "outputs/studies/${study.name}"
    """Holds every record of the study (relative paths are taken from the launch directory)."""


@dataclass
class LRScalingConfig:
    alpha: float = 0.5
    """z = y * (B_large / B_small) ** alpha. 0.5: square-root rule for Adam (Malladi et al. 2022,
    "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"); 1.0: linear rule (Goyal et
    al. 2017, "Accurate, Large Minibatch SGD"); -0.5: the seed text's literal (old/new)^0.5."""
    adam_sde: bool = False
    """Also scale Adam's betas and eps with the batch ratio (Malladi et al. 2022, SDE rule)."""


@dataclass
class OptimConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices only: never to norms, biases or embeddings."""
    grad_clip: float | None = 1.0
    """Global-norm clip; null disables clipping (the norm is still measured and logged)."""


@dataclass
class ScheduleConfig:
    warmup_shape: str = "linear"
    """linear | cosine | exponential: how the LR rises from ~0 to its peak over warmup_steps.
    exponential starts at 1e-3 x peak and spends equal steps per decade of LR (the LR range test's
    sweep, Smith 2017, "Cyclical Learning Rates for Training Neural Networks")."""
    decay: str = "cosine"
    """cosine | constant: what follows the warmup."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay, as a fraction of the peak LR."""

    def __post_init__(self) -> None:
        _check(
            self.warmup_shape in ("linear", "cosine", "exponential"),
            "schedule.warmup_shape",
            self.warmup_shape,
            "use linear, cosine or exponential",
        )
        _check(
            self.decay in ("cosine", "constant"),
            "schedule.decay",
            self.decay,
            "use cosine or constant",
        )
        _check(
            0 <= self.min_lr_ratio <= 1,
            "schedule.min_lr_ratio",
            self.min_lr_ratio,
            "use a fraction in [0, 1]",
        )


ONSETS = ("rise", "min_loss", "plateau")


@dataclass
class DetectorConfig:
    smoothing: float = 0.9
    """EMA factor of the per-step loss (0.9 ~ a 10-step window): a small-batch loss is noisy, and
    a raw-loss rule would fire on single bad batches."""
    threshold: float = 0.05
    """Relative rise of the smoothed loss above its running best that counts as a rise. A small LM
    trained with Adam and clipping often destabilises into a plateau 10-30 % above its best rather
    than exploding (Lightning's LR finder's 4x rule rarely fires); 5 % sits well below that and well
    above the smoothed noise of the default run (about 1 %)."""
    patience: int = 10
    """Consecutive optimizer steps the rise must last: one noisy stretch is not an instability."""
    onset_tolerance: float = 0.01
    """onset=rise: the onset is the last step, before the alarm, where the smoothed loss was within
    this fraction of its best: where it *left* its best, not where the alarm fired. onset=plateau:
    the first step within this fraction of the best: where it *reached* it."""
    ignore_first: int = 20
    """Steps ignored at the start, where the loss falls from ln(V) and is not yet informative."""
    onset: str = "rise"
    """Which step of a detected instability is x (the alarm is the same rise rule for both):
    rise: the seed's literal reading, the last step still within onset_tolerance of the best before
    the smoothed loss rose threshold above it; min_loss: the step of the lowest smoothed loss, where
    a higher LR stopped buying a lower loss (the LR range test's reading, Smith 2017); plateau: the
    first step within onset_tolerance of that lowest loss, where a higher LR stopped buying a
    material improvement (see batchsize_study/spike.py)."""
    lag_correction: bool = False
    """Move the onset back by the EMA's mean lag, smoothing / (1 - smoothing) steps (9 at 0.9):
    the smoothed loss follows a linear trend that many steps late. At a sharp turn its minimum
    trails by less, at a kink into a plateau by more: measure before relying on it."""

    def __post_init__(self) -> None:
        _check(
            0 <= self.smoothing < 1,
            "detector.smoothing",
            self.smoothing,
            "use an EMA factor in [0, 1)",
        )
        _check(
            self.threshold > 0,
            "detector.threshold",
            self.threshold,
            "use a positive relative rise, e.g. 0.05",
        )
        _check(
            self.patience >= 1, "detector.patience", self.patience, "use a positive number of steps"
        )
        _check(
            self.onset_tolerance >= 0,
            "detector.onset_tolerance",
            self.onset_tolerance,
            "use 0 or a small positive fraction, e.g. 0.01",
        )
        _check(
            self.ignore_first >= 0,
            "detector.ignore_first",
            self.ignore_first,
            "use 0 or more steps",
        )
        _check(
            self.onset in ONSETS, "detector.onset", self.onset, f"use one of {', '.join(ONSETS)}"
        )


@dataclass
class SweepConfig:
    """``experiment=lr_sweep``: the real training schedule and budget at a log grid of peak LRs."""

    multiples: list[float] = field(
        default_factory=lambda: [1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0]
    )
    """Peak LRs as multiples of the study's x (its superconvergence record)."""
    lrs: list[float] | None = None
    """Absolute peak LRs; when given, used instead of multiples (no x needed)."""
    snap: bool = True
    """Round each LR to the nearest power of 2, so sweeps anchored at different x (seeds, detector
    settings, batch sizes) share their runs; the record keeps the multiple asked for and lr / x."""
    seeds: list[int] | None = None
    """Seeds per LR; null means the top-level seed only. Several seeds give the noise estimate."""
    sigmas: float = 2.0
    """An LR is within noise of the best when its final loss is above the best by at most this many
    combined standard errors (how they are estimated: batchsize_study/lr_sensitivity.py)."""
    final_window: int = 20
    """Steps at the end of each run whose training losses give a one-seed noise estimate."""

    def __post_init__(self) -> None:
        _check(
            len(self.multiples) >= 1 and all(m > 0 for m in self.multiples),
            "sweep.multiples",
            self.multiples,
            "use positive multiples of x, e.g. [0.125,0.25,0.5,1]",
        )
        if self.lrs is not None:
            _check(
                len(self.lrs) >= 1 and all(v > 0 for v in self.lrs),
                "sweep.lrs",
                self.lrs,
                "use positive learning rates, e.g. [0.001,0.002,0.004], or null for multiples",
            )
        if self.seeds is not None:
            _check(
                len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
                "sweep.seeds",
                self.seeds,
                "use distinct seeds, e.g. [0,1,2], or null for the top-level seed",
            )
        _check(self.sigmas > 0, "sweep.sigmas", self.sigmas, "use a positive number, e.g. 2")
        _check(
            self.final_window >= 2, "sweep.final_window", self.final_window, "use at least 2 steps"
        )


@dataclass
class NoiseConfig:
    enabled: bool = True
    """small/large: estimate the simple gradient noise scale B_simple = tr(Sigma) / |G|^2
    (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training") from the gradients the
    run already computes: each micro-batch's contribution against the accumulated gradient."""
    ema: float = 0.95
    """EMA factor of the estimator's numerator and denominator, kept apart (a ratio of EMAs: the
    paper's appendix A.1 warns that the ratio of two noisy unbiased estimates is biased)."""
    split: int = 2
    """With one micro-batch per step on one device there is only one batch size; then the micro
    batch is run as this many smaller micro-batches (the same sequences, the same gradient up to
    rounding). 1 turns the split off, and such runs then record no noise scale."""


@dataclass
class ModelConfig:
    arch: str = "llama"
    """A Hugging Face model_type (llama, gpt2, ...): built from config, no weights downloaded."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int | None = None
    """MLP width; null means the architecture's usual multiple of hidden_size."""
    seq_len: int = 128
    """Tokens per training window (the model's context)."""
    dropout: float = 0.0
    tie_embeddings: bool = True
    attn_implementation: str = "sdpa"
    """sdpa (fused attention kernels) or eager."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other field of the Hugging Face config, passed through."""


@dataclass
class TokenizerConfig:
    kind: str = "bpe"
    """bpe: byte-level BPE trained on the training split; pretrained: `name` (a hub id or a
    local tokenizer.json)."""
    vocab_size: int = 4096
    name: str | None = None


@dataclass
class DataConfig:
    source: str = "stdlib"
    """stdlib (the Python standard library's own source), text (files), or hub (datasets)."""
    path: str | None = None
    """text: a file, a folder or a glob of text files."""
    name: str | None = None
    """hub: the dataset name or a local dataset folder, for datasets.load_dataset."""
    options: dict[str, Any] = field(default_factory=dict)
    """hub: extra keyword arguments for datasets.load_dataset (config name, data_files, ...)."""
    split: str = "train"
    """hub: the split read as the corpus (our own train/val split is made from it by document)."""
    text_field: str = "text"
    glob: str = "**/*.py"
    """stdlib and text folders: which files are documents."""
    max_documents: int | None = None
    """Keep only the first N documents (sorted by name): for smoke runs and tests."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (by a hash of the document's name)."""
    val_max_windows: int = 64
    """Validation windows evaluated at each validation (the first N: a fixed set)."""
    cache_dir: str | None = None
    """Token caches; null means $BATCHSIZE_STUDY_CACHE, else ~/.cache/batchsize_study."""
    num_workers: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class LoggerConfig:
    wandb: bool = True
    """wandb is on by default in offline mode (no network wait); `wandb sync` uploads later."""
    wandb_mode: str = "offline"
    """offline | online | disabled."""
    wandb_project: str = "batchsize_study"
    wandb_entity: str | None = None
    wandb_init_timeout: float = 30.0
    """Seconds to wait for an online wandb before falling back to offline."""
    log_every_steps: int = 1
    """Per-step metrics reach the host in batches of this many steps (one sync per batch)."""


@dataclass
class Config:
    task: str = "superconvergence"
    """Which step of the procedure: set by the experiment config group."""
    study: StudyConfig = field(default_factory=StudyConfig)
    seed: int = 0
    batch_size: int = 16
    """Effective batch: sequences per optimizer step (devices x micro batch x accumulation)."""
    micro_batch_size: int = 16
    """Sequences per device per forward pass; accumulation is derived, never set by hand."""
    max_steps: int = 300
    warmup_steps: int = 30
    lr: float | None = None
    """Peak LR. superconvergence: the too-high target. small/large: null derives it."""
    lr_factor: float = 0.5
    """y = lr_factor * x: the small batch trains at this fraction of the measured unstable LR."""
    lr_scaling: LRScalingConfig = field(default_factory=LRScalingConfig)
    allow_step_mismatch: bool = False
    """large_batch: allow max_steps/warmup_steps to differ from the small run's (recorded)."""
    upstream_wait_seconds: float = 0.0
    """How long a run waits for its upstream record to appear (parallel launchers)."""
    val_every_steps: int = 50
    val_at_end: bool = True
    checkpoint_every_steps: int = 100
    """small/large: a resumable checkpoint every N optimizer steps."""
    force: bool = False
    """Re-run a finished run instead of reporting its existing record."""
    precision: str = "auto"
    """auto picks bf16-mixed where the CPU/GPU supports it, else fp32 (or 16-mixed on old GPUs)."""
    compile: bool = False
    """torch.compile the model."""
    peak_flops: float | None = None
    """Override the per-device peak FLOP/s used for MFU."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """lr_sweep settings: the grid of peak LRs, seeds, the noise tolerance."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Passed to lightning.Trainer (accelerator, devices, num_nodes, strategy, ...)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    probe: dict[str, Any] = field(default_factory=dict)
    """stability_probe settings (multiples of x, steps per probe)."""
    compare: dict[str, Any] = field(default_factory=dict)
    """compare settings."""


def register_schema() -> None:
    """Register the schema so conf/config.yaml can name it first in its defaults list."""
    ConfigStore.instance().store(name="schema", node=Config)


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(key, value, fix)


def validate(cfg: DictConfig | Config) -> Config:
    """Check ranges and cross-key rules; return the typed config.

    Every failure is a ConfigError naming the key, its value and the fix.
    """
    c: Config = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg  # type: ignore[assignment]
    _check(
        c.task in TASKS, "task", c.task, f"use one of {', '.join(TASKS)} (set by experiment=...)"
    )
    _check(c.batch_size >= 1, "batch_size", c.batch_size, "use a positive number of sequences")
    _check(c.micro_batch_size >= 1, "micro_batch_size", c.micro_batch_size, "use a positive number")
    _check(
        c.micro_batch_size <= c.batch_size,
        "micro_batch_size",
        c.micro_batch_size,
        f"must not exceed batch_size={c.batch_size}; lower micro_batch_size",
    )
    _check(c.max_steps >= 1, "max_steps", c.max_steps, "use a positive number of optimizer steps")
    _check(
        0 <= c.warmup_steps <= c.max_steps,
        "warmup_steps",
        c.warmup_steps,
        f"use 0..max_steps ({c.max_steps})",
    )
    if c.lr is not None:
        _check(c.lr > 0, "lr", c.lr, "use a positive learning rate, or null to derive it")
    if c.task == "superconvergence":
        _check(
            c.lr is not None, "lr", c.lr, "superconvergence needs the too-high target, e.g. lr=0.05"
        )
    _check(c.lr_factor > 0, "lr_factor", c.lr_factor, "use a positive fraction such as 0.5")
    _check(c.val_every_steps >= 1, "val_every_steps", c.val_every_steps, "use a positive number")
    _check(
        c.checkpoint_every_steps >= 1,
        "checkpoint_every_steps",
        c.checkpoint_every_steps,
        "use a positive number",
    )
    _check(
        c.upstream_wait_seconds >= 0,
        "upstream_wait_seconds",
        c.upstream_wait_seconds,
        "use 0 (fail at once) or a number of seconds",
    )
    o = c.optim
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        o.betas,
        "use two numbers in [0, 1)",
    )
    _check(o.eps > 0, "optim.eps", o.eps, "use a small positive number such as 1e-8")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "use 0 or a positive number")
    if o.grad_clip is not None:
        _check(
            o.grad_clip > 0,
            "optim.grad_clip",
            o.grad_clip,
            "use a positive norm, or null for no clipping",
        )
    m = c.model
    for key in ("hidden_size", "num_layers", "num_heads", "seq_len"):
        _check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "use a positive integer")
    _check(
        m.hidden_size % m.num_heads == 0,
        "model.num_heads",
        m.num_heads,
        f"must divide model.hidden_size={m.hidden_size}",
    )
    dt = c.data
    _check(
        dt.source in ("stdlib", "text", "hub"),
        "data.source",
        dt.source,
        "use data=stdlib, data=text or data=hub",
    )
    if dt.source == "text":
        _check(bool(dt.path), "data.path", dt.path, "give data.path=<file, folder or glob>")
    if dt.source == "hub":
        _check(bool(dt.name), "data.name", dt.name, "give data.name=<dataset name or local folder>")
    _check(
        0 < dt.val_fraction < 1, "data.val_fraction", dt.val_fraction, "use a fraction in (0, 1)"
    )
    _check(
        dt.val_max_windows >= 1, "data.val_max_windows", dt.val_max_windows, "use a positive number"
    )
    if dt.max_documents is not None:
        _check(
            dt.max_documents >= 2,
            "data.max_documents",
            dt.max_documents,
            "use at least 2 (train and val)",
        )
    t = dt.tokenizer
    _check(t.kind in ("bpe", "pretrained"), "data.tokenizer.kind", t.kind, "use bpe or pretrained")
    if t.kind == "bpe":
        _check(
            260 <= t.vocab_size <= 2**32 - 1,
            "data.tokenizer.vocab_size",
            t.vocab_size,
            "use at least 260 (256 bytes + specials)",
        )
    else:
        _check(
            bool(t.name), "data.tokenizer.name", t.name, "give a hub id or a tokenizer.json path"
        )
    n = c.noise
    _check(0 <= n.ema < 1, "noise.ema", n.ema, "use an EMA factor in [0, 1), e.g. 0.95")
    _check(n.split >= 1, "noise.split", n.split, "use 1 (no split) or a small divisor such as 2")
    lg = c.logger
    _check(
        lg.wandb_mode in ("offline", "online", "disabled"),
        "logger.wandb_mode",
        lg.wandb_mode,
        "use offline, online or disabled",
    )
    _check(
        lg.log_every_steps >= 1,
        "logger.log_every_steps",
        lg.log_every_steps,
        "use a positive number",
    )
    return c
