"""The config schema: typed dataclasses that Hydra merges the YAML files into.

OmegaConf checks types when the files and the command line are merged (``batch_size=abc`` fails
there, naming the key); :func:`validate` checks ranges and cross-key rules before any work, so a
wrong value costs the user one line and no compute. Modules below the experiment layer receive
these dataclasses (or plain values), never a ``DictConfig``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from batchsize_study.errors import ConfigError


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    """Raise the one-line ConfigError (key, value, fix) unless ``ok``."""
    if not ok:
        raise ConfigError(key, value, fix)


HOST_ALLOCATORS = ("auto", "system")
X_FROM = ("seed", "median")
Y_FROM = ("rule", "probe")

TASKS = (
    "superconvergence",
    "small_batch",
    "large_batch",
    "compare",
    "stability_probe",
    "evaluate",
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

    def __post_init__(self) -> None:
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            self.betas,
            "use two numbers in [0, 1)",
        )
        _check(self.eps > 0, "optim.eps", self.eps, "use a small positive number such as 1e-8")
        _check(
            self.weight_decay >= 0,
            "optim.weight_decay",
            self.weight_decay,
            "use 0 or a positive number",
        )
        if self.grad_clip is not None:
            _check(
                self.grad_clip > 0,
                "optim.grad_clip",
                self.grad_clip,
                "use a positive norm, or null for no clipping",
            )


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
    """Consecutive optimizer steps the rise must last: one noisy stretch is not a destabilisation."""
    onset_tolerance: float = 0.01
    """onset=rise: the onset is the last step, before the alarm, where the smoothed loss was within
    this fraction of its best: where it *left* its best, not where the alarm fired. onset=plateau:
    the first step within this fraction of the best: where it *reached* it."""
    ignore_first: int = 20
    """Steps ignored at the start, where the loss falls from ln(V) and is not yet informative."""
    onset: str = "rise"
    """Which step of a detected destabilisation is x (the alarm is the same rise rule for both):
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
    point: int | None = None
    """null: one process trains the whole grid, then writes the summary. An index: only grid
    point ``point`` of seeds x LRs (seed-major, LRs as asked), so the points can run as parallel
    jobs; a ``-m`` multirun of experiment=lr_sweep expands it over the grid by itself."""

    @staticmethod
    def grid_size(sweep: Any) -> int:
        """Grid points (seeds x asked LRs) of a sweep node or SweepConfig; the ``sweep_points``
        resolver that expands ``sweep.point`` in a multirun (conf/experiment/lr_sweep.yaml)."""
        asked = sweep.lrs if sweep.lrs is not None else sweep.multiples
        return len(asked) * len(sweep.seeds or [None])

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
        if self.point is not None:
            n = SweepConfig.grid_size(self)
            _check(
                0 <= self.point < n,
                "sweep.point",
                self.point,
                f"use an index of the grid's {n} points (0..{n - 1}), or null for the whole grid",
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
    """With one micro-batch per step on one device there is only one batch size; then the
    backward of a measured step runs in this many pieces inside the training step (the same
    sequences, the same gradient up to rounding). 1 turns the split off, and such runs then record
    no noise scale."""
    split_every: int = 4
    """With the split: only every this many optimizer steps are split and measured (the estimate
    stays unbiased, see noise.py; the others run at full speed). 1 splits every step."""

    def __post_init__(self) -> None:
        _check(0 <= self.ema < 1, "noise.ema", self.ema, "use an EMA factor in [0, 1), e.g. 0.95")
        _check(
            self.split >= 1,
            "noise.split",
            self.split,
            "use 1 (no split) or a small divisor such as 2",
        )
        _check(
            self.split_every >= 1,
            "noise.split_every",
            self.split_every,
            "use 1 (every step) or a small number of steps such as 4",
        )


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

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "seq_len"):
            value = getattr(self, key)
            _check(value >= 1, f"model.{key}", value, "use a positive integer")
        _check(
            self.hidden_size % self.num_heads == 0,
            "model.num_heads",
            self.num_heads,
            f"must divide model.hidden_size={self.hidden_size}",
        )


@dataclass
class TokenizerConfig:
    kind: str = "bpe"
    """bpe: byte-level BPE trained on the training split; pretrained: `name` (a hub id or a
    local tokenizer.json)."""
    vocab_size: int = 4096
    name: str | None = None
    train_sample_mb: float = 32.0
    """bpe: the tokenizer is trained on at most this many MB of training-split text, drawn across
    the corpus by document hash. BPE's memory follows the sample's distinct words, so a bounded
    sample bounds it at any corpus size. 32 covers the default stdlib corpus's training split
    whole (about 29 MB: its tokenizer is the one trained on all of it); see
    benchmarks/README.md for time and memory per sample size."""

    def __post_init__(self) -> None:
        _check(
            self.train_sample_mb > 0,
            "data.tokenizer.train_sample_mb",
            self.train_sample_mb,
            "use a positive number of MB, e.g. 32",
        )
        _check(
            self.kind in ("bpe", "pretrained"),
            "data.tokenizer.kind",
            self.kind,
            "use bpe or pretrained",
        )
        if self.kind == "bpe":
            _check(
                260 <= self.vocab_size <= 2**32 - 1,
                "data.tokenizer.vocab_size",
                self.vocab_size,
                "use at least 260 (256 bytes + specials)",
            )
        else:
            _check(
                bool(self.name),
                "data.tokenizer.name",
                self.name,
                "give a hub id or a tokenizer.json path",
            )


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
    """hub: the split read as the corpus (our own train/val/test split is made from it by
    document)."""
    text_field: str = "text"
    glob: str = "**/*.py"
    """stdlib and text folders: which files are documents."""
    max_documents: int | None = None
    """Keep only the first N documents (sorted by name): for smoke runs and tests."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (by a hash of the document's name)."""
    test_fraction: float = 0.2
    """Fraction of documents held out as the test split (test.bin), which training and
    validation never read (experiment=evaluate scores the saved models on it). Measured on the
    default study, the per-window loss spread is ~1 nat, so a standard error of the mean below
    0.01 nats needs ~13k windows of 128 tokens: 0.05 gave 3.7k windows (se 0.019), 0.2 gives
    about four times that. Training keeps ~7M stdlib tokens, more than the large batch reads."""
    val_max_windows: int = 256
    """Validation windows evaluated at each validation (the first N: a fixed set). 256 windows
    put the standard error of the validation loss near 0.06 nats (per-window spread ~1 nat), so
    the small/large difference of the default study (0.1-0.3 nats) is resolved; 64 could not
    (se ~0.12). Costs ~12 % of a default small_batch run's wall time, ~3 % of a large_batch's."""
    streaming: bool = False
    """hub: read the dataset with datasets' streaming mode (nothing downloaded or materialised
    beyond what is read; pair it with max_tokens for a large dataset)."""
    max_tokens: int | None = None
    """Token budget: stop reading once the three splits together hold this many tokens (whole
    documents; the cache records it). null: the caller's budget if it gives one, else read all.
    To feed runs of T training tokens give about T / (1 - val_fraction - test_fraction)."""
    block_chars: int = 65536
    """Long texts are cut into blocks of whole paragraphs of at most this many characters, each
    a document of its own (see batchsize_study/data/sources.py for the exact rule)."""
    long_document_chars: int = 4_000_000
    """A file larger than this (bytes on disk), a row longer than this (characters), and the
    only file of a corpus are cut into blocks; others stay whole documents."""
    num_proc: int | None = None
    """Encode processes; null uses every core this process may run on. Does not change tokens."""
    cache_dir: str | None = None
    """Token caches; null means $BATCHSIZE_STUDY_CACHE, else ~/.cache/batchsize_study."""
    num_workers: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        _check(
            self.source in ("stdlib", "text", "hub"),
            "data.source",
            self.source,
            "use data=stdlib, data=text or data=hub",
        )
        if self.source == "text":
            _check(bool(self.path), "data.path", self.path, "give data.path=<file, folder or glob>")
        if self.source == "hub":
            _check(
                bool(self.name),
                "data.name",
                self.name,
                "give data.name=<dataset name or local folder>",
            )
        _check(
            0 < self.val_fraction < 1,
            "data.val_fraction",
            self.val_fraction,
            "use a fraction in (0, 1)",
        )
        _check(
            0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
            "data.test_fraction",
            self.test_fraction,
            f"use a fraction in (0, 1) with data.val_fraction={self.val_fraction} + it below 1",
        )
        _check(
            self.val_max_windows >= 1,
            "data.val_max_windows",
            self.val_max_windows,
            "use a positive number",
        )
        if self.max_documents is not None:
            _check(
                self.max_documents >= 3,
                "data.max_documents",
                self.max_documents,
                "use at least 3 (train, val and test)",
            )
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "use 0 or more")
        _check(
            not self.streaming or self.source == "hub",
            "data.streaming",
            self.streaming,
            "streaming applies to data=hub (files are always read as a stream); drop it",
        )
        if self.max_tokens is not None:
            _check(
                self.max_tokens >= 1,
                "data.max_tokens",
                self.max_tokens,
                "use a positive number of tokens, or null to read the whole corpus",
            )
        _check(
            self.block_chars >= 1024,
            "data.block_chars",
            self.block_chars,
            "use at least 1024 characters per block",
        )
        _check(
            self.long_document_chars >= self.block_chars,
            "data.long_document_chars",
            self.long_document_chars,
            f"use at least data.block_chars={self.block_chars}",
        )
        if self.num_proc is not None:
            _check(
                self.num_proc >= 1,
                "data.num_proc",
                self.num_proc,
                "use a positive number of processes, or null for every core",
            )
        if self.source == "text" and self.path and not any(c in self.path for c in "*?["):
            path = os.path.expanduser(self.path)
            _check(
                os.path.exists(path),
                "data.path",
                self.path,
                "no such file, folder or matching glob; give an existing text file, a folder of "
                "them, or a glob such as 'corpus/*.txt'",
            )


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
    log_every_steps: int | None = None
    """Per-step metrics reach the host in batches of this many steps (one device sync per batch).
    null (auto) picks per device (runtime.resolve_log_every_steps): 1 on CPU, where a sync costs
    nothing (the host does the compute); 20 on a GPU, where each sync makes the device idle while
    the host prepares the next step, so one sync per 20 steps bounds that idle time to 1/20 of the
    host's per-step overhead (nanoGPT syncs every 10 iterations for the same reason; Lightning's
    own logging defaults to every 50 steps). Every step still gets its row; the detector and the
    progress bar see them at most this many steps late."""

    def __post_init__(self) -> None:
        _check(
            self.wandb_mode in ("offline", "online", "disabled"),
            "logger.wandb_mode",
            self.wandb_mode,
            "use offline, online or disabled",
        )
        _check(
            self.log_every_steps is None or self.log_every_steps >= 1,
            "logger.log_every_steps",
            self.log_every_steps,
            "use a positive number, or null to pick per device",
        )


@dataclass
class ProbeConfig:
    """``probe.*``: short constant-LR runs at multiples of x (experiment=stability_probe)."""

    multiples: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0, 2.0, 4.0])
    """Multiples of x probed, each one short run. 1/8 reaches below the 0.25x a 4x larger model's
    optimum sat at (docs/lr_sweep.md), so ``y_from=probe`` finds it inside the grid."""
    steps: int = 100
    """Optimizer steps per probe."""
    warmup: int = 10
    """Linear warmup steps before the constant LR."""
    final_window: int = 10
    """The final loss of a probe is the mean of its last this many step losses."""
    trend_window: int = 20
    """Reported only: whether the smoothed loss still set a new best in the last this many steps
    (clamped to steps - 1)."""
    noise_sigmas: float = 2.0
    """A multiple stops improving when its final loss is worse than the best lower multiple's by
    more than this many combined standard errors."""
    lr_find: bool = True
    """Also run Lightning's Tuner.lr_find on the same model and data."""
    lr_find_min_lr: float = 1e-5
    lr_find_max_lr: float = 1.0
    lr_find_num_training: int = 100

    def __post_init__(self) -> None:
        self.multiples = [float(m) for m in self.multiples]
        _check(
            len(self.multiples) >= 2 and all(m > 0 for m in self.multiples),
            "probe.multiples",
            self.multiples,
            "use at least two positive multiples of x",
        )
        _check(self.steps >= 2, "probe.steps", self.steps, "use at least 2 optimizer steps")
        _check(
            0 <= self.warmup < self.steps,
            "probe.warmup",
            self.warmup,
            f"use 0..probe.steps-1 ({self.steps - 1})",
        )
        _check(
            1 <= self.final_window < self.steps,
            "probe.final_window",
            self.final_window,
            f"use 1..probe.steps-1 ({self.steps - 1})",
        )
        self.trend_window = max(1, min(self.trend_window, self.steps - 1))
        _check(
            0 < self.lr_find_min_lr < self.lr_find_max_lr,
            "probe.lr_find_min_lr",
            self.lr_find_min_lr,
            "use 0 < lr_find_min_lr < lr_find_max_lr",
        )


@dataclass
class CompareConfig:
    """``compare.*``: how experiment=compare reads and judges the runs."""

    ema: float = 0.9
    """EMA factor of the per-step training loss before runs are compared (0.9 ~ 10 steps)."""
    confidence: float = 0.95
    """Level of the per-step interval across seeds and of the paired test."""
    overfit_tolerance: float = 0.01
    """Relative rise of the validation loss above its minimum that flags overfitting."""
    table_points: int = 8
    """Rows of the matched-steps table (evenly spaced steps, plus every validation step)."""
    dpi: int = 130
    """Resolution of the report's figures."""

    def __post_init__(self) -> None:
        _check(0 <= self.ema < 1, "compare.ema", self.ema, "use an EMA factor in [0, 1), e.g. 0.9")
        _check(
            0 < self.confidence < 1,
            "compare.confidence",
            self.confidence,
            "use a level in (0, 1)",
        )
        _check(
            self.overfit_tolerance >= 0,
            "compare.overfit_tolerance",
            self.overfit_tolerance,
            "use 0 or a positive fraction",
        )
        _check(self.table_points >= 1, "compare.table_points", self.table_points, "use 1 or more")
        _check(self.dpi >= 10, "compare.dpi", self.dpi, "use a resolution such as 130")


@dataclass
class EvaluateConfig:
    """``evaluate.*``: how experiment=evaluate tests the saved small- and large-batch models on
    the held-out test split."""

    max_windows: int | None = None
    """Test windows scored per model (the first N, the same for every model); null: all of them."""
    batch_size: int = 64
    """Windows per forward pass: sets memory and speed; a window's loss changes with it only by
    floating-point rounding (the batches are fixed, so a given config is reproducible)."""
    max_se: float = 0.01
    """Target standard error (nats) of each model's mean test loss; above it the record and the
    report say loudly that the test split is too small to separate the models."""
    confidence: float = 0.95
    """Level of the paired bootstrap interval of large minus small."""
    bootstrap_resamples: int = 10000
    """Resamples of the paired bootstrap over test windows."""
    block_windows: int = 8
    """Also bootstrap means of this many consecutive windows (batch means): adjacent windows of
    one document are correlated, which the per-window interval ignores. 1 turns it off."""
    samples: int = 3
    """Generated samples per model, each from its own fixed prompt out of the test split."""
    prompt_tokens: int = 32
    """Tokens of test text each sample continues."""
    sample_tokens: int = 64
    """Tokens generated per sample."""
    temperature: float = 0.0
    """0: greedy decoding; above 0: sampling at this temperature, seeded by ``seed``."""

    def __post_init__(self) -> None:
        if self.max_windows is not None:
            _check(
                self.max_windows >= 2,
                "evaluate.max_windows",
                self.max_windows,
                "use 2 or more windows, or null for the whole test split",
            )
        _check(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "use 1 or more")
        _check(self.max_se > 0, "evaluate.max_se", self.max_se, "use a positive SE such as 0.01")
        _check(
            0 < self.confidence < 1, "evaluate.confidence", self.confidence, "use a level in (0, 1)"
        )
        _check(
            self.bootstrap_resamples >= 100,
            "evaluate.bootstrap_resamples",
            self.bootstrap_resamples,
            "use 100 or more (10000 by default)",
        )
        _check(
            self.block_windows >= 1,
            "evaluate.block_windows",
            self.block_windows,
            "use 1 (off) or a small number of windows such as 8",
        )
        _check(self.samples >= 0, "evaluate.samples", self.samples, "use 0 (none) or more")
        _check(
            self.prompt_tokens >= 1,
            "evaluate.prompt_tokens",
            self.prompt_tokens,
            "use 1 or more tokens",
        )
        _check(
            self.sample_tokens >= 1,
            "evaluate.sample_tokens",
            self.sample_tokens,
            "use 1 or more tokens",
        )
        _check(
            self.temperature >= 0,
            "evaluate.temperature",
            self.temperature,
            "use 0 (greedy) or a positive temperature such as 0.8",
        )


@dataclass
class Config:
    task: str = "superconvergence"
    """Which step of the procedure: set by the experiment config group."""
    study: StudyConfig = field(default_factory=StudyConfig)
    seed: int = 0
    batch_size: int = 16
    """Effective batch: sequences per optimizer step (devices x micro batch x accumulation)."""
    micro_batch_size: int | str = 16
    """Sequences per device per forward pass; accumulation is derived, never set by hand. auto:
    the largest divisor of the per-device batch that fits the GPU (trial steps backing off on
    out-of-memory, batchsize_study/microbatch.py); the whole per-device batch on a CPU."""
    max_steps: int = 300
    warmup_steps: int = 30
    lr: float | None = None
    """Peak LR. superconvergence: the too-high target. small/large: null derives it."""
    lr_factor: float = 0.5
    """y = lr_factor * x: the small batch trains at this fraction of the measured unstable LR."""
    x_from: str = "seed"
    """Which superconvergence records x comes from. seed: the run's own seed's (else the median
    of the study's); median: the median over every superconvergence run of this configuration
    and batch size (run them with ``-m experiment=superconvergence seed=0,1,2``): one seed's x
    scatters by a factor of ~2 (docs/lr_sweep.md), the median of several by less."""
    y_from: str = "rule"
    """Where the small batch's y comes from. rule: y = lr_factor * x (the seed's procedure).
    probe: the stability probe's short-horizon optimum (the probe multiple of x with the lowest
    final loss; run ``experiment=stability_probe`` first). The best LR falls below x/2 as the model
    grows while x does not; the probe's optimum tracked the 300-step sweeps' best at both model
    sizes checked (0.5x and 0.25x, against 0.44x and 0.22x: docs/lr_sweep.md)."""
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
    """auto picks per device (runtime.auto_precision): bf16-mixed on GPUs that run bf16 natively
    (compute capability 8.0+, Ampere and later) and on CPUs with native bf16 matmuls (AVX512-BF16/AMX: 1.31x fp32 for the default
    model, benchmarks/README.md), 16-mixed on older GPUs, else fp32 (32-true)."""
    compile: bool = False
    """torch.compile the model. Off on every device by default: on CPU it loses (about 120 s of
    extra warm-up against default runs of a few minutes, benchmarks/README.md section 5); on a GPU
    turn it on for long runs: nanoGPT reports GPT-2 124M iterations cut from ~250 to 135 ms for a
    build of "~a minute" (karpathy/nanoGPT README and train.py); benchmarks/gpu.sh measures it for
    the 124M preset here (pending: no GPU so far)."""
    host_allocator: str = "auto"
    """auto: a run training on the CPU under glibc keeps freed memory in the process instead of
    handing every large tensor back to the kernel and faulting it in again on the next step
    (runtime.tune_host_allocator; small_batch: ~34k page faults per step without it; with it +12 %
    tokens/s in a paired bare-loop test, +1 to +17 % in the default study's records; peak memory
    +5.5 % on the package's small_batch run, +13 % on the bare loop; benchmarks/README.md 1c). system: leave malloc as it is."""
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
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig())
    """experiment=stability_probe: multiples of x, steps per probe, Lightning's LR finder."""
    compare: CompareConfig = field(default_factory=lambda: CompareConfig())
    """experiment=compare: smoothing, confidence level, flags."""
    evaluate: EvaluateConfig = field(default_factory=lambda: EvaluateConfig())
    """experiment=evaluate: test windows, the SE target, the bootstrap, generated samples."""
    callbacks: dict[str, Any] = field(default_factory=dict)
    """Extra Lightning callbacks, each a node with a ``_target_`` that Hydra instantiates
    (``+callbacks.name._target_=package.Class``); appended after the study's own callbacks."""


def register_schema() -> None:
    """Register the schema so conf/config.yaml can name it first in its defaults list."""
    ConfigStore.instance().store(name="schema", node=Config)
    if not OmegaConf.has_resolver("sweep_points"):
        OmegaConf.register_new_resolver("sweep_points", SweepConfig.grid_size)


DERIVED_TRAINER_KEYS = {
    "accumulate_grad_batches": "derived from batch_size / (micro_batch_size x devices); set "
    "batch_size and micro_batch_size instead",
    "max_steps": "use the top-level max_steps=",
    "max_epochs": "runs are counted in optimizer steps; use max_steps=",
    "precision": "use the top-level precision=",
    "val_check_interval": "use val_every_steps= (optimizer steps)",
    "check_val_every_n_epoch": "use val_every_steps= (optimizer steps)",
    "use_distributed_sampler": "the study's sampler shards the data itself; remove it",
    "enable_checkpointing": "small_batch/large_batch keep a resumable checkpoint; use "
    "checkpoint_every_steps=",
    "callbacks": "use callbacks.<name>._target_=<package.Class> (a config node)",
    "logger": "use logger=default|csv|wandb_online",
    "default_root_dir": "runs are written under study.dir; use study.dir=",
}
"""Trainer arguments the study derives (and records): a ``trainer.*`` override would silently
change the run while its record states the planned values, so each is refused with the key to
use instead."""


def _refuse_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """A key appended with ``+`` that the schema does not know would be dropped silently by
    OmegaConf.to_object: refuse it, naming the known keys."""
    known = {f.name: f for f in fields(schema)}
    for key in node:
        name = str(key)
        if name not in known:
            if prefix or name != "hydra":
                raise ConfigError(
                    f"{prefix}{name}",
                    node.get(name),
                    f"unknown key; use one of {', '.join(sorted(known))}",
                )
            continue
        child = node._get_node(name)
        sub = known[name].default_factory  # type: ignore[misc]
        if isinstance(child, DictConfig) and callable(sub):
            sample = sub()
            if is_dataclass(sample):
                _refuse_unknown_keys(child, type(sample), f"{prefix}{name}.")


def validate(cfg: DictConfig | Config) -> Config:
    """Check ranges and cross-key rules; return the typed config.

    Every failure is a ConfigError naming the key, its value and the fix.
    """
    if isinstance(cfg, DictConfig):
        _refuse_unknown_keys(cfg, Config, "")
    c: Config = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg  # type: ignore[assignment]
    _check(
        c.task in TASKS, "task", c.task, f"use one of {', '.join(TASKS)} (set by experiment=...)"
    )
    _check(c.batch_size >= 1, "batch_size", c.batch_size, "use a positive number of sequences")
    if c.micro_batch_size != "auto":
        _check(
            isinstance(c.micro_batch_size, int) and c.micro_batch_size >= 1,
            "micro_batch_size",
            c.micro_batch_size,
            "use a positive number, or auto",
        )
        _check(
            c.micro_batch_size <= c.batch_size,  # type: ignore[operator]
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
    _check(c.x_from in X_FROM, "x_from", c.x_from, "use " + " or ".join(X_FROM))
    _check(c.y_from in Y_FROM, "y_from", c.y_from, "use " + " or ".join(Y_FROM))
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
    _check(
        c.host_allocator in HOST_ALLOCATORS,
        "host_allocator",
        c.host_allocator,
        "use " + " or ".join(HOST_ALLOCATORS),
    )
    # data.* is checked by DataConfig.__post_init__ (and TokenizerConfig's) when it is built.
    for key, fix in DERIVED_TRAINER_KEYS.items():
        _check(key not in c.trainer, f"trainer.{key}", c.trainer.get(key), fix)
    return c
