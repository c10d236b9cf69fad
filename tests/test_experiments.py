"""End to end through the real config and the real code, at smoke size."""

from __future__ import annotations

import csv
import json
import math
import platform
from pathlib import Path

import pytest
import torch

from batchsize_study.errors import ConfigError, UpstreamError
from batchsize_study.experiments import run
from batchsize_study.model import CausalLMModule


def rows(record: dict) -> list[dict]:
    with open(record["metrics_csv"]) as fh:
        return [r for r in csv.DictReader(fh) if r["train_loss"]]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """superconvergence -> small_batch -> large_batch, as the multirun would run them."""
    study = tmp_path_factory.mktemp("chain")
    from conftest import make_cfg

    out = {}
    for exp in ("superconvergence", "small_batch", "large_batch"):
        out[exp] = run(make_cfg(study, f"experiment={exp}"))
    out["study"] = study
    return out


def test_superconvergence_diverges_and_records_the_onset(chain):
    sc = chain["superconvergence"]
    assert sc["status"] == "diverged"
    assert sc["unstable_lr"] > 0 and 1 <= sc["spike_step"] < sc["steps_done"]
    assert (
        sc["checkpoint"] is None and not (Path(sc["metrics_csv"]).parent / "checkpoints").exists()
    )
    r = rows(sc)
    assert [int(x["step"]) for x in r] == list(
        range(1, sc["steps_done"] + 1)
    )  # every optimizer step
    # x is the LR of the onset step as it was applied, not the alarm's
    assert float(r[sc["spike_step"] - 1]["lr"]) == pytest.approx(sc["unstable_lr"])
    for key in (
        "seed",
        "batch_size",
        "micro_batch_size",
        "devices",
        "accumulate_grad_batches",
        "seq_len",
        "max_steps",
        "warmup_steps",
        "lr",
        "lr_source",
        "steps_done",
        "tokens_seen",
        "final_train_loss",
        "wall_seconds",
        "config_hash",
        "corpus_fingerprint",
        "package_version",
        "metrics_csv",
    ):
        assert key in sc, key
    glibc = platform.libc_ver()[0] == "glibc"
    assert sc["host_allocator"] == ("glibc: mmap and trim off" if glibc else "system")


def test_chain_derives_y_and_z_exactly(chain):
    sc, sb, lb = chain["superconvergence"], chain["small_batch"], chain["large_batch"]
    assert sb["status"] == lb["status"] == "completed"
    assert sb["lr"] == 0.5 * sc["unstable_lr"]
    assert lb["lr"] == pytest.approx(
        sb["lr"] * math.sqrt(lb["batch_size"] / sb["batch_size"]), rel=1e-12
    )
    assert (
        "derived" in sb["lr_source"] and str(Path(sc["metrics_csv"]).parent.name) in sb["lr_source"]
    )
    assert Path(sb["metrics_csv"]).parent.name in lb["lr_source"]
    assert sb["max_steps"] == lb["max_steps"] == sb["steps_done"] == lb["steps_done"]
    assert sb["warmup_steps"] == lb["warmup_steps"]
    for rec in (sb, lb):
        assert (
            rec["devices"] * rec["micro_batch_size"] * rec["accumulate_grad_batches"]
            == rec["batch_size"]
        )
    assert lb["tokens_seen"] == 4 * sb["tokens_seen"]
    assert lb["z_over_x"] == pytest.approx(lb["lr"] / sc["unstable_lr"])


def test_checkpoint_loads_back_and_reproduces_val_loss(chain):
    import lightning.pytorch as pl

    from batchsize_study.config import DataConfig, TokenizerConfig
    from batchsize_study.data import TokenDataModule, prepare_corpus

    rec = chain["small_batch"]
    module = CausalLMModule.load_from_checkpoint(rec["checkpoint"], map_location="cpu")
    data = DataConfig(
        max_documents=150, val_max_windows=16, tokenizer=TokenizerConfig(vocab_size=512)
    )
    corpus = prepare_corpus(data, 32)
    dm = TokenDataModule(data, corpus, 32, 16, 0, samples_per_rank=16)
    trainer = pl.Trainer(
        logger=False, enable_progress_bar=False, precision="bf16-mixed", enable_model_summary=False
    )
    out = trainer.validate(module, datamodule=dm, verbose=False)
    assert module.last_val["val/loss"] == pytest.approx(rec["final_val_loss"], rel=1e-4)
    assert out is not None


def test_finished_run_is_reported_not_redone(chain):
    from conftest import make_cfg

    again = run(make_cfg(chain["study"], "experiment=small_batch"))
    assert again["finished_at"] == chain["small_batch"]["finished_at"]


def test_small_batch_without_upstream_is_one_clear_line(cfg_factory, tmp_path):
    with pytest.raises(UpstreamError) as e:
        run(cfg_factory("experiment=small_batch"))
    assert "experiment=superconvergence" in str(e.value)
    assert not (tmp_path / "study" / "runs").exists()  # nothing half-written


def test_explicit_lr_overrides_the_derivation(cfg_factory):
    rec = run(cfg_factory("experiment=small_batch", "lr=0.001", "max_steps=10", "warmup_steps=2"))
    assert rec["status"] == "completed" and rec["lr"] == 0.001
    assert rec["lr_source"].startswith("given")


def test_large_batch_refuses_a_different_step_budget(chain):
    from conftest import make_cfg

    with pytest.raises(ConfigError) as e:
        run(make_cfg(chain["study"], "experiment=large_batch", "max_steps=30"))
    assert "max_steps=30" in str(e.value)
    rec = run(
        make_cfg(
            chain["study"],
            "experiment=large_batch",
            "max_steps=30",
            "warmup_steps=5",
            "allow_step_mismatch=true",
            "batch_size=32",
        )
    )
    assert rec["status"] == "completed"
    assert rec["derivation"]["small_max_steps"] == 40 and rec["max_steps"] == 30


def test_seed_sweep_gives_independent_chains(tmp_path):
    from conftest import make_cfg

    recs = {}
    for seed in (0, 1):
        for exp in ("superconvergence", "small_batch"):
            recs[(exp, seed)] = run(make_cfg(tmp_path, f"experiment={exp}", f"seed={seed}"))
    for seed in (0, 1):
        sc, sb = recs[("superconvergence", seed)], recs[("small_batch", seed)]
        assert sb["lr"] == 0.5 * sc["unstable_lr"]
        assert f"same seed ({seed})" in sb["lr_source"]
    assert recs[("superconvergence", 0)]["run_id"] != recs[("superconvergence", 1)]["run_id"]


def test_same_seed_fp32_gives_identical_metrics(tmp_path):
    from conftest import make_cfg

    a = run(make_cfg(tmp_path / "a", "experiment=small_batch", "lr=0.01", "precision=32-true"))
    b = run(make_cfg(tmp_path / "b", "experiment=small_batch", "lr=0.01", "precision=32-true"))
    cols = ("step", "tokens", "lr", "train_loss", "grad_norm", "val_loss")

    def read(rec: dict) -> list[dict]:
        with open(rec["metrics_csv"]) as fh:
            return [{k: x[k] for k in cols} for x in csv.DictReader(fh)]

    assert read(a) == read(b)
    assert (
        json.loads(Path(a["metrics_csv"]).with_name("result.json").read_text())["final_train_loss"]
        == b["final_train_loss"]
    )


@pytest.mark.parametrize("batch", ["16", "64"])  # accumulation 1 and 4: the logged loss is unscaled
def test_initial_loss_is_near_ln_vocab(tmp_path, batch):
    from conftest import make_cfg

    rec = run(
        make_cfg(
            tmp_path,
            "experiment=small_batch",
            "lr=0.001",
            "max_steps=2",
            "warmup_steps=1",
            "precision=32-true",
            f"batch_size={batch}",
        )
    )
    assert rec["devices"] * rec["micro_batch_size"] * rec["accumulate_grad_batches"] == int(batch)
    if batch == "64":
        assert rec["accumulate_grad_batches"] > 1  # the loss is summed over micro-batches here
    else:  # one micro-batch; step 1's backward runs in noise.split pieces (noise.py)
        assert rec["accumulate_grad_batches"] == 1 and rec["noise"]["measured_every"] >= 1
    first = float(rows(rec)[0]["train_loss"])
    assert abs(first - math.log(rec["vocab_size"])) / math.log(rec["vocab_size"]) < 0.10


def test_param_groups_exclude_norms_biases_embeddings():
    from batchsize_study.config import ModelConfig
    from batchsize_study.model import build_model, param_groups

    for arch in ("llama", "gpt2"):
        model = build_model(
            ModelConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=2, seq_len=16), 300
        )
        decay, no_decay = param_groups(model, 0.1)
        emb = model.get_input_embeddings().weight
        assert all(p.ndim == 2 for p in decay["params"])
        assert any(p is emb for p in no_decay["params"])
        assert not any(p is emb for p in decay["params"])
        n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
        assert n == sum(p.numel() for p in model.parameters())
        assert torch.is_tensor(emb)


def test_final_validation_when_the_schedule_misses_the_last_step(tmp_path):
    from conftest import make_cfg

    rec = run(
        make_cfg(
            tmp_path,
            "experiment=small_batch",
            "lr=0.003",
            "max_steps=30",
            "val_every_steps=20",
            "checkpoint_every_steps=50",
        )
    )
    with open(rec["metrics_csv"]) as fh:
        val = [(int(r["step"]), float(r["val_loss"])) for r in csv.DictReader(fh) if r["val_loss"]]
    assert [s for s, _ in val] == [20, 30]
    assert rec["final_val_loss"] == pytest.approx(val[-1][1])
