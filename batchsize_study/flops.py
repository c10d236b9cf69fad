"""FLOPs per token and per-device peak FLOP/s, for model FLOPs utilisation (MFU).

MFU as defined by Chowdhery et al. 2022 (PaLM, Appendix B): achieved model FLOP/s over the
device's peak, with model FLOPs per token = 6 N + 12 L H Q T (N non-embedding parameters,
L layers, H heads, Q head size, T sequence length; the attention term counts QK^T and AV).
"""

from __future__ import annotations

import functools
import time

import torch

# Dense peak FLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},
    "T4": {"bf16": 0.0, "fp16": 65e12, "fp32": 8.1e12},
}


def _dtype_key(precision: str) -> str:
    if "bf16" in str(precision):
        return "bf16"
    if "16" in str(precision):
        return "fp16"
    return "fp32"


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6 N + 12 L H Q T (PaLM, Appendix B), N excluding the embedding table."""
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    n_params = sum(p.numel() for p in model.parameters()) - embed
    # The tied/untied LM head is a matmul per token even when its weight is the embedding.
    head = model.get_output_embeddings()
    n_params += head.weight.numel() if head is not None else 0
    return float(6 * n_params + 12 * n_layers * hidden * seq_len)


@functools.lru_cache(maxsize=4)
def measured_cpu_peak(dtype: str = "fp32", size: int = 1024, seconds: float = 0.3) -> float:
    """The CPU has no data-sheet row: measure a square matmul for a fraction of a second."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=torch_dtype)
    b = torch.randn(size, size, dtype=torch_dtype)
    a @ b  # warm up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0)


def peak_flops_per_device(precision: str) -> float | None:
    """The device's dense peak for this precision: table for GPUs, a measurement on CPU."""
    key = _dtype_key(precision)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for tag, row in PEAK_FLOPS.items():
            if tag in name and row.get(key):
                return row[key]
        return None
    return measured_cpu_peak(key)
