"""FLOPs per token and per-device peak FLOP/s, for model FLOPs utilisation (MFU).

MFU as defined by Chowdhery et al. 2022 (PaLM, Appendix B): achieved model FLOP/s over the
device's peak. Both halves come from Lightning where Lightning has them:

- FLOPs per token: ``lightning.fabric.utilities.throughput.measure_flops`` (``FlopCounterMode``)
  over one forward and backward pass of a meta-device copy of the model (no memory, no compute),
  so any architecture Hugging Face builds is counted without a formula per family. The analytic
  PaLM count 6 N + 12 L H Q T stays only as the fall-back and the tests' cross-check.
- GPU peaks: ``lightning.fabric.utilities.throughput.get_available_flops`` (its per-GPU table).

What Lightning lacks, kept here: a CPU peak (no data sheet: measured), and two corrections for the
H200, which Lightning 2.6 lists at the *sparse* figure (2.0e15 for bf16; NVIDIA's dense figure is
989 TFLOP/s, like the H100 SXM's) and does not find at all under the name the driver reports
("NVIDIA H200", without "SXM1"/"NVL1").
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from transformers import AutoModelForCausalLM

log = logging.getLogger(__name__)

# Dense bf16/fp16 peaks per NVIDIA's H200 data sheet (the sparsity figures halved): Lightning's
# rows for the H200 hold the sparse ones, and its name matching misses "NVIDIA H200".
_H200_DENSE: dict[str, float] = {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}
_H200_NVL_DENSE: dict[str, float] = {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}


def _dtype_key(precision: str) -> str:
    if "bf16" in str(precision):
        return "bf16"
    if "16" in str(precision):
        return "fp16"
    return "fp32"


_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    """Forward + backward FLOPs of one sequence of ``seq_len`` tokens, counted by Lightning's
    ``measure_flops`` on a meta-device copy built from the model's Hugging Face config (so a
    compiled or wrapped model is counted as the plain architecture), divided by ``seq_len``.

    Attention is counted as the full T x T product, PaLM's convention (a causal kernel skips about
    half of it).
    """
    hf_cfg = model.config
    attn = getattr(hf_cfg, "_attn_implementation", None) or "sdpa"
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)
    meta.train()
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")

    def loss(out) -> torch.Tensor:  # noqa: ANN001 - a CausalLMOutput
        logits = out.logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ids.reshape(-1))

    return float(measure_flops(meta, lambda: meta(input_ids=ids), loss)) / seq_len


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


def gpu_peak(device: torch.device, precision: str) -> float | None:
    """The dense data-sheet peak of this GPU at this precision: Lightning's table, with the H200
    corrected (see the module docstring); None where neither knows the device."""
    name = torch.cuda.get_device_name(device).lower()
    key = _dtype_key(precision)
    if "h200" in name:
        return (_H200_NVL_DENSE if "nvl" in name else _H200_DENSE).get(key)
    peak = get_available_flops(device, _TORCH_DTYPE[key])
    return float(peak) if peak else None


def peak_flops_per_device(precision: str) -> float | None:
    """The device's dense peak for this precision: the table for GPUs, a measurement on CPU.
    An unknown GPU gets None (no MFU) and a warning naming the override."""
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        peak = gpu_peak(device, precision)
        if peak is None:
            log.warning(
                "no peak FLOP/s known for %r at %s: MFU is not logged; set peak_flops=<FLOP/s>",
                torch.cuda.get_device_name(device),
                precision,
            )
        return peak
    return measured_cpu_peak(_dtype_key(precision))
