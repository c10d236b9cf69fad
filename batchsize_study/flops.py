"""FLOPs per token and per-device peak FLOP/s, for model FLOPs utilisation (MFU).

MFU as defined by Chowdhery et al. 2022 (PaLM, Appendix B): achieved model FLOP/s over the
device's peak. Model FLOPs per token are *measured*: one forward and backward pass of a
meta-device copy of the model under ``torch.utils.flop_counter.FlopCounterMode`` (as litgpt
does), so any architecture Hugging Face builds is counted without a formula per family. The
analytic PaLM count, 6 N + 12 L H Q T, stays as a cross-check (tests/test_flops.py).
"""

from __future__ import annotations

import functools
import logging
import re
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device (no structured sparsity), from the vendors' data sheets.
# First match wins, so the more specific names come first (H100 PCIe before H100).
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM
    ("H800", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 80e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("A6000", {"bf16": 155e12, "fp16": 155e12, "fp32": 38.7e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("5090", {"bf16": 209.5e12, "fp16": 209.5e12, "fp32": 104.8e12}),
    ("4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("4080", {"bf16": 97.5e12, "fp16": 97.5e12, "fp32": 48.7e12}),
    ("3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    ("3080", {"bf16": 59.5e12, "fp16": 59.5e12, "fp32": 29.8e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]


def _dtype_key(precision: str) -> str:
    if "bf16" in str(precision):
        return "bf16"
    if "16" in str(precision):
        return "fp16"
    return "fp32"


def analytic_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, Appendix B); N excludes the embedding
    table but includes the LM head, which is a matmul per token even when tied."""
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    n_params = sum(p.numel() for p in model.parameters()) - embed
    head = model.get_output_embeddings()
    n_params += head.weight.numel() if head is not None else 0
    return float(6 * n_params + 12 * n_layers * hidden * seq_len)


def measured_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Forward + backward FLOPs of one sequence of ``seq_len`` tokens, counted by
    ``FlopCounterMode`` on a meta-device copy (no memory, no compute), divided by ``seq_len``.

    The copy is built from the model's Hugging Face config, so a compiled or wrapped model is
    counted as the plain architecture. Attention is counted as the full T x T product, as in
    PaLM's convention (a causal kernel skips about half of it).
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    hf_cfg = model.config
    attn = getattr(hf_cfg, "_attn_implementation", None) or "sdpa"
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)
    meta.train()
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        logits = meta(input_ids=ids).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ids.reshape(-1))
        loss.backward()
    return float(counter.get_total_flops()) / seq_len


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: measured; the analytic PaLM count if the meta pass fails."""
    try:
        return measured_flops_per_token(model, seq_len)
    except Exception as exc:  # an architecture the meta device or the counter cannot run
        log.warning(
            "could not count FLOPs on a meta copy (%s: %s); using the analytic 6N + 12LHQT",
            type(exc).__name__,
            str(exc).splitlines()[0][:120] if str(exc) else "",
        )
        return analytic_flops_per_token(model, seq_len)


@functools.lru_cache(maxsize=4)
def measured_cpu_peak(dtype: str = "fp32", size: int = 1024, seconds: float = 0.3) -> float:
    """The CPU has no data-sheet row: the best of three short square-matmul bursts, at the
    thread count training uses (the best, because other processes only ever slow it down)."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=torch_dtype)
    b = torch.randn(size, size, dtype=torch_dtype)
    a @ b  # warm up (oneDNN picks its kernel on the first call)
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - t0))
    return best


def table_peak(device_name: str, precision: str) -> float | None:
    """The data-sheet peak of a named GPU for this precision, or None if it is not listed."""
    key = _dtype_key(precision)
    for tag, row in PEAK_FLOPS:
        if re.search(rf"(^|[\s\-_]){re.escape(tag)}($|[\s\-_])", device_name) and row.get(key):
            return row[key]
    return None


def peak_flops_per_device(precision: str) -> float | None:
    """The device's dense peak for this precision: the table for GPUs, a measurement on CPU.
    An unlisted GPU gets None (no MFU) and a warning naming the override."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = table_peak(name, precision)
        if peak is None:
            log.warning(
                "no peak FLOP/s listed for %r at %s: MFU is not logged; set peak_flops=<FLOP/s>",
                name,
                precision,
            )
        return peak
    return measured_cpu_peak(_dtype_key(precision))
