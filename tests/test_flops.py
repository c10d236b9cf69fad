"""FLOPs per token (measured on a meta copy vs the analytic PaLM count), the peak table, and the
MFU and throughput that reach the logs and the record."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from batchsize_study.config import ModelConfig
from batchsize_study.experiments import run
from batchsize_study.flops import (
    analytic_flops_per_token,
    flops_per_token,
    gpu_peak,
    measured_cpu_peak,
    measured_flops_per_token,
)
from batchsize_study.model import build_model


@pytest.mark.parametrize(
    "arch,hidden,layers,heads,seq_len,vocab",
    [
        ("llama", 128, 4, 4, 128, 4096),  # the default model
        ("gpt2", 64, 2, 4, 256, 512),
        ("llama", 96, 3, 3, 512, 1000),  # attention-heavy: T well above d
    ],
)
def test_measured_flops_agree_with_palm_formula(arch, hidden, layers, heads, seq_len, vocab):
    model = build_model(
        ModelConfig(
            arch=arch, hidden_size=hidden, num_layers=layers, num_heads=heads, seq_len=seq_len
        ),
        vocab,
    )
    measured = measured_flops_per_token(model, seq_len)
    analytic = analytic_flops_per_token(model, seq_len)
    # The counter sees only matmuls (norms, biases and activations are not in 6N's matmul count,
    # but their parameters are): the two should agree to a few percent, and within 20 % always.
    assert measured == pytest.approx(analytic, rel=0.2)
    assert flops_per_token(model, seq_len) == measured
    # The meta copy leaves the real model untouched.
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_measured_attention_term_grows_with_sequence_length():
    """Per token, doubling T adds 12 L d T FLOPs of attention (PaLM, Appendix B): the counter
    must see QK^T and AV, not only the weight matmuls."""
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, seq_len=512)
    model = build_model(cfg, 512)
    short, long = (measured_flops_per_token(model, t) for t in (128, 256))
    assert long - short == pytest.approx(12 * 2 * 64 * 128, rel=0.05)


@pytest.mark.parametrize(
    "name,precision,peak",
    [
        ("NVIDIA H200", "bf16-mixed", 989e12),  # the driver's name: Lightning finds no row
        ("NVIDIA H200 NVL", "bf16-mixed", 835e12),
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12),  # Lightning's table from here on
        ("NVIDIA H100 PCIe", "16-mixed", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312e12),
        ("NVIDIA L4", "bf16-mixed", 121e12),
        ("Tesla T4", "bf16-mixed", None),  # no bf16 on Turing
        ("Some Future GPU", "bf16-mixed", None),
    ],
)
def test_gpu_peak_is_lightnings_table_with_the_h200_dense(monkeypatch, name, precision, peak):
    """Dense peaks only: an MFU against a sparsity figure would read half of what it is."""
    from lightning.fabric.utilities.throughput import get_available_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got = gpu_peak(torch.device("cuda"), precision)
    assert got == (pytest.approx(peak) if peak else None)
    if "H200" in name:  # the gap being filled is real (else drop the correction)
        assert get_available_flops(torch.device("cuda"), torch.bfloat16) in (None, 2.0e15)


def test_cpu_peak_is_measured_per_dtype():
    fp32 = measured_cpu_peak.__wrapped__("fp32", size=128, seconds=0.03)
    bf16 = measured_cpu_peak.__wrapped__("bf16", size=128, seconds=0.03)
    assert math.isfinite(fp32) and fp32 > 0
    assert math.isfinite(bf16) and bf16 > 0


def test_mfu_and_throughput_in_logs_and_record(cfg_factory):
    """Each train row of metrics.csv carries tokens/s and MFU = flops_per_token * tokens/s / peak;
    the record reports the median over steps after the warm-up (the first interval holds the
    start-up) and the MFU of that median."""
    rec = run(cfg_factory("experiment=superconvergence", "lr=0.001", "peak_flops=1e12"))
    assert rec["peak_flops"] == 1e12
    with torch.device("cpu"):
        model = build_model(
            ModelConfig(hidden_size=32, num_layers=2, num_heads=2, seq_len=32),
            rec["vocab_size"],
        )
    assert rec["flops_per_token"] == pytest.approx(measured_flops_per_token(model, 32))
    with open(rec["metrics_csv"], newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["train_loss"]]
    assert len(rows) == rec["steps_done"] == 40
    for r in rows:
        tps, mfu = float(r["tokens_per_second"]), float(r["mfu"])
        assert mfu == pytest.approx(rec["flops_per_token"] * tps / 1e12)
    steady = [float(r["tokens_per_second"]) for r in rows if int(r["step"]) > 3]
    assert rec["tokens_per_second"] == pytest.approx(sorted(steady)[len(steady) // 2])
    assert rec["mfu"] == pytest.approx(rec["flops_per_token"] * rec["tokens_per_second"] / 1e12)


class _CaptureLogger:
    """Just enough of a Lightning logger to record what the StepRecorder hands over."""

    def __init__(self) -> None:
        import threading

        self.calls: list[tuple[int, dict]] = []
        self.threads: set[str] = set()
        self._threading = threading

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.threads.add(self._threading.current_thread().name)
        self.calls.append((step, dict(metrics)))


def test_loggers_get_every_step_in_order_with_mfu(tmp_path):
    """The recorder hands metrics to the loggers from its background thread; by the end of fit
    every step has arrived, in order, with throughput/mfu."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger

    from batchsize_study.recorder import StepRecorder
    from batchsize_study.steps import StepStats

    capture = _CaptureLogger()

    class Capture(Logger):
        name, version = "capture", 0

        def log_metrics(self, metrics, step=None):  # noqa: ANN001
            capture.log_metrics(metrics, step)

        def log_hyperparams(self, params, *args, **kwargs):  # noqa: ANN001
            pass

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.step_stats = StepStats()  # the recorder's contract (steps.py)

        def training_step(self, batch, batch_idx):  # noqa: ANN001
            return self.lin(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    rec = StepRecorder(str(tmp_path / "metrics.csv"), 8, 3, flops_per_token=100.0, peak_flops=1e6)
    trainer = pl.Trainer(
        max_steps=7,
        logger=Capture(),
        callbacks=[rec],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    data = torch.utils.data.DataLoader(torch.randn(32, 4), batch_size=2)
    trainer.fit(Tiny(), train_dataloaders=data)
    steps = [s for s, m in capture.calls if "train/loss" in m]
    assert steps == list(range(1, 8))
    assert all("throughput/mfu" in m and m["throughput/mfu"] > 0 for _, m in capture.calls)
    assert capture.threads == {"metrics-logger"}


def test_log_every_steps_is_picked_per_device(monkeypatch):
    """null: one host sync per step on CPU, one per GPU_LOG_EVERY_STEPS on a GPU (config.py
    LoggerConfig says why); a number is kept; a bad one is one ConfigError line."""
    from batchsize_study.config import LoggerConfig
    from batchsize_study.errors import ConfigError
    from batchsize_study.runtime import GPU_LOG_EVERY_STEPS, resolve_log_every_steps

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_log_every_steps(None, "auto") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_log_every_steps(None, "auto") == GPU_LOG_EVERY_STEPS > 1
    assert resolve_log_every_steps(None, "cpu") == 1  # a GPU machine told to train on CPU
    assert resolve_log_every_steps(7, "gpu") == 7
    with pytest.raises(ConfigError, match="logger.log_every_steps"):
        LoggerConfig(log_every_steps=0)
