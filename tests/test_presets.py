"""Presets a home GPU can run untouched (issue 21, item 3): each model preset brings its own
vocabulary; micro_batch_size=auto finds the largest micro batch that fits; precision=auto picks
bf16 only where the hardware runs it natively."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from batchsize_study import microbatch
from batchsize_study.batch import plan_batch
from batchsize_study.config import validate
from batchsize_study.errors import ConfigError
from batchsize_study.experiments import run
from batchsize_study.microbatch import StepTrial, divisors, find_micro_batch
from batchsize_study.runtime import auto_precision

SMALL = ("experiment=small_batch", "lr=0.003", "precision=32-true")

# ---------------------------------------------------------------- 1. vocabulary per preset


@pytest.mark.parametrize(
    ("preset", "vocab"), [("tiny", 4096), ("llama_20m", 16384), ("gpt2_124m", 50257)]
)
def test_each_preset_brings_its_vocabulary(tmp_path, preset, vocab):
    c = validate(make_cfg(tmp_path, f"model={preset}", smoke=False))
    assert c.data.tokenizer.vocab_size == vocab
    # the home-GPU presets find their micro batch; the CPU default keeps its 16 (golden snapshot)
    assert c.micro_batch_size == (16 if preset == "tiny" else "auto")
    hand = validate(make_cfg(tmp_path, f"model={preset}", "micro_batch_size=8", smoke=False))
    assert hand.micro_batch_size == 8


def test_the_default_keeps_its_vocabulary_and_a_preset_stays_overridable(tmp_path):
    assert validate(make_cfg(tmp_path, smoke=False)).data.tokenizer.vocab_size == 4096
    c = validate(make_cfg(tmp_path, "model=gpt2_124m", "data.tokenizer.vocab_size=1000"))
    assert c.data.tokenizer.vocab_size == 1000 and c.model.arch == "gpt2"
    # debug=smoke (after the model in the defaults list) still shrinks the vocabulary.
    assert validate(make_cfg(tmp_path, "model=llama_20m")).data.tokenizer.vocab_size == 512


# ---------------------------------------------------------------- 2. micro_batch_size=auto


def _limited(limit: int, calls: list[int]):
    """A trial that runs out of memory above ``limit`` sequences (both ways a device says so)."""

    def trial(micro: int) -> None:
        calls.append(micro)
        if micro > limit:
            if micro % 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    return trial


@pytest.mark.parametrize(
    ("per_device", "limit", "want"),
    [(64, 1000, 64), (64, 40, 32), (64, 5, 4), (48, 20, 16), (48, 13, 12), (36, 10, 9), (7, 6, 1)],
)
def test_auto_finds_the_largest_fitting_divisor(per_device, limit, want):
    calls: list[int] = []
    freed: list[int] = []
    s = find_micro_batch(per_device, _limited(limit, calls), free=lambda: freed.append(1))
    assert s.micro_batch_size == want
    assert want == max(d for d in divisors(per_device) if d <= limit)
    assert calls[0] == per_device and all(per_device % m == 0 for m in calls)
    assert len(freed) == len(calls)  # memory freed after every trial
    # halving, then a binary search among the divisors in between: logarithmic
    assert len(calls) <= per_device.bit_length() + len(divisors(per_device)).bit_length()


def test_auto_refuses_when_one_sequence_does_not_fit_and_passes_other_errors():
    with pytest.raises(ConfigError, match=r"^micro_batch_size='auto': not even one sequence"):
        find_micro_batch(8, _limited(0, []), free=lambda: None)

    def broken(micro: int) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        find_micro_batch(8, broken, free=lambda: None)


def test_auto_is_validated_and_planned(tmp_path):
    c = validate(make_cfg(tmp_path, "micro_batch_size=auto"))
    assert c.micro_batch_size == "auto"
    plan = plan_batch(c.batch_size, c.micro_batch_size, 2, 32, 10)
    assert (plan.micro_batch_size, plan.accumulate_grad_batches) == (8, 1)
    with pytest.raises(
        ConfigError, match=r"^micro_batch_size='abc': use a positive number, or auto"
    ):
        validate(make_cfg(tmp_path, "micro_batch_size=abc"))
    with pytest.raises(ConfigError, match=r"^batch_size=9: must be a multiple of 2 device"):
        plan_batch(9, "auto", 2, 32, 10)
    # the probe's lr_find takes the number the training runs resolve auto to
    probe = validate(make_cfg(tmp_path, "micro_batch_size=auto", "experiment=stability_probe"))
    assert probe.micro_batch_size == "auto" and probe.probe.lr_find


def test_real_trial_step_runs_on_cpu(tmp_path):
    c = validate(make_cfg(tmp_path))
    trial = StepTrial(c.model, 64, "32-true", torch.device("cpu"))
    before = [p.detach().clone() for p in trial.model.parameters()]
    trial(2)
    # lr=0: AdamW's moments exist, the weights are untouched.
    assert all(torch.equal(a, b) for a, b in zip(before, trial.model.parameters()))
    assert trial.opt.state
    trial.close()
    assert trial.model is None


def _train_losses(rec: dict) -> list[float]:
    with open(rec["metrics_csv"], newline="") as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh) if r["train_loss"]]


def test_auto_run_matches_the_hand_set_micro_batch(tmp_path, monkeypatch):
    """Under a simulated limit of 6 sequences auto resolves to 4 of the 16 (a divisor), and the
    run is the hand-set micro_batch_size=4 run: same accumulation, data order and losses."""
    short = ("max_steps=8", "warmup_steps=2", "val_every_steps=4", "checkpoint_every_steps=4")
    tried: list[int] = []

    def limited_trial(c, vocab_size, precision):  # the real trial step, on the CPU, capped
        real = StepTrial(c.model, vocab_size, precision, torch.device("cpu"))

        def trial(micro: int) -> None:
            tried.append(micro)
            if micro > 6:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            real(micro)

        trial.close = real.close  # type: ignore[attr-defined]
        return trial

    monkeypatch.setattr(microbatch, "device_trial", limited_trial)
    auto = run(make_cfg(tmp_path, *SMALL, *short, "micro_batch_size=auto"))
    monkeypatch.undo()
    hand = run(make_cfg(tmp_path, *SMALL, *short, "micro_batch_size=4"))

    assert tried == [16, 8, 4]
    for rec in (auto, hand):
        assert rec["status"] == "completed", rec["message"]
        assert (rec["batch_size"], rec["micro_batch_size"]) == (16, 4)
        assert rec["accumulate_grad_batches"] == 4
    assert auto["run_id"] != hand["run_id"]  # the setting, not the number, names the run
    d = auto["derivation"]
    assert d["micro_batch_size_setting"] == "auto" and d["micro_batch_size"] == 4
    assert d["micro_batch_search"]["tried"] == [[16, False], [8, False], [4, True]]
    assert "micro_batch_size_setting" not in hand["derivation"]
    a, h = _train_losses(auto), _train_losses(hand)
    assert len(a) == len(h) == 8
    assert a == pytest.approx(h, rel=1e-6, abs=0)


def test_auto_on_cpu_takes_the_whole_per_device_batch(tmp_path):
    rec = run(make_cfg(tmp_path, *SMALL, "max_steps=2", "warmup_steps=1", "micro_batch_size=auto"))
    assert rec["status"] == "completed", rec["message"]
    assert (rec["micro_batch_size"], rec["accumulate_grad_batches"]) == (16, 1)
    assert rec["derivation"]["micro_batch_search"] == {"per_device_batch": 16, "device": "cpu"}


# ---------------------------------------------------------------- 3. precision=auto


@pytest.mark.parametrize(
    ("device", "capability", "cpu_bf16", "want"),
    [
        ("cuda", (9, 0), False, "bf16-mixed"),  # Hopper
        ("cuda", (8, 9), False, "bf16-mixed"),  # Ada (RTX 40xx)
        ("cuda", (8, 6), False, "bf16-mixed"),  # consumer Ampere (RTX 30xx)
        ("cuda", (8, 0), False, "bf16-mixed"),  # A100
        ("cuda", (7, 5), False, "16-mixed"),  # Turing: is_bf16_supported() says True (emulated)
        ("cuda", (7, 0), False, "16-mixed"),  # Volta
        ("cuda", (6, 1), True, "16-mixed"),  # Pascal; the CPU's bf16 does not matter on a GPU
        ("cuda", None, False, "16-mixed"),
        ("cpu", None, True, "bf16-mixed"),  # AMX / AVX512-BF16
        ("cpu", None, False, "32-true"),
        ("mps", None, False, "32-true"),
    ],
)
def test_auto_precision_uses_bf16_only_where_native(device, capability, cpu_bf16, want):
    assert auto_precision(device, capability, cpu_bf16) == want


def test_auto_precision_ignores_emulated_bf16(monkeypatch):
    from batchsize_study import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    assert runtime.resolve_precision("auto", "gpu") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 6))
    assert runtime.resolve_precision("auto", "auto") == "bf16-mixed"
    assert runtime.resolve_precision("32-true", "gpu") == "32-true"


# ---------------------------------------------------------------- 4. the 20M preset on CPU


@pytest.mark.slow
def test_llama_20m_preset_trains_on_cpu(tmp_path):
    """model=llama_20m with only short overrides, on the embedded corpus at the preset's own
    16k vocabulary (its BPE is trained here: the session's token cache is empty)."""
    t0 = time.time()
    rec = run(
        make_cfg(
            tmp_path,
            "model=llama_20m",
            "experiment=small_batch",
            "lr=0.001",
            "max_steps=3",
            "warmup_steps=1",
            "batch_size=2",
            "micro_batch_size=auto",
            "model.seq_len=64",
            "data.val_max_windows=4",
            smoke=False,
        )
    )
    assert rec["status"] == "completed", rec["message"]
    assert rec["vocab_size"] == 16384 and rec["steps_done"] == 3
    assert (rec["micro_batch_size"], rec["accumulate_grad_batches"]) == (2, 1)
    losses = _train_losses(rec)
    assert len(losses) == 3 and all(0 < v < 12 for v in losses)  # ln(16384) = 9.7
    print(f"llama_20m preset on CPU: {time.time() - t0:.1f}s, losses {losses}")
    assert Path(rec["metrics_csv"]).exists()
