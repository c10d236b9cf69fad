"""FLOPs per token of the default model and the 124M preset: Lightning's measure_flops on a meta
copy (what MFU uses) against the analytic PaLM count 6N + 12LHQT (Chowdhery et al. 2022, App. B).

    python benchmarks/flops_check.py
"""

from __future__ import annotations

import torch

from batchsize_study.config import ModelConfig
from batchsize_study.flops import analytic_flops_per_token, measured_flops_per_token
from batchsize_study.model import build_model

MODELS = {
    "default (llama h128 L4 seq128, vocab 4096)": (ModelConfig(), 4096),
    "gpt2_124m (h768 L12 seq1024, vocab 50257)": (
        ModelConfig(arch="gpt2", hidden_size=768, num_layers=12, num_heads=12, seq_len=1024),
        50257,
    ),
}


def main() -> None:
    for name, (cfg, vocab) in MODELS.items():
        with torch.device("meta"):  # the analytic count needs only shapes
            model = build_model(cfg, vocab)
        measured = measured_flops_per_token(model, cfg.seq_len)
        analytic = analytic_flops_per_token(model, cfg.seq_len)
        print(
            f"{name}: measured {measured / 1e6:,.2f} MFLOP/token, 6N+12LHQT "
            f"{analytic / 1e6:,.2f}, measured/analytic {measured / analytic:.4f}"
        )


if __name__ == "__main__":
    main()
