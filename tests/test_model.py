"""CausalLMModule's settings object, the checkpoints it writes and reads (old ones included), and
the imports of the modules that build the model."""

from __future__ import annotations

import ast
from dataclasses import asdict, replace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cli_utils import assert_fresh_interpreter_runs

from batchsize_study.config import ModelConfig, OptimConfig, ScheduleConfig
from batchsize_study.errors import UpstreamError
from batchsize_study.evaluate import load_model
from batchsize_study.model import CausalLMModule, ModuleSettings

PACKAGE = Path(__file__).resolve().parents[1] / "batchsize_study"

SETTINGS = ModuleSettings(
    model=ModelConfig(hidden_size=32, num_layers=2, num_heads=2, seq_len=16),
    optim=OptimConfig(),
    schedule=ScheduleConfig(),
    vocab_size=97,
    peak_lr=3e-3,
    max_steps=2,
    warmup_steps=1,
    noise_split=2,
    noise_split_every=3,
)


def _old_hparams(s: ModuleSettings) -> dict:
    """The hyperparameters the module saved before ModuleSettings: its ten flat keywords."""
    return {
        "model_cfg": asdict(s.model),
        "optim_cfg": asdict(s.optim),
        "schedule_cfg": asdict(s.schedule),
        "vocab_size": s.vocab_size,
        "peak_lr": s.peak_lr,
        "max_steps": s.max_steps,
        "warmup_steps": s.warmup_steps,
        "compile": s.compile,
        "noise_split": s.noise_split,
        "noise_split_every": s.noise_split_every,
    }


def _trained_checkpoint(path: Path, settings: ModuleSettings = SETTINGS) -> CausalLMModule:
    """A real Lightning checkpoint of a module trained two steps on random tokens."""
    pl.seed_everything(0, verbose=False)
    module = CausalLMModule(settings)
    data = torch.utils.data.DataLoader(
        torch.randint(0, settings.vocab_size, (8, settings.model.seq_len + 1)), batch_size=4
    )
    trainer = pl.Trainer(
        max_steps=settings.max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=data)
    trainer.save_checkpoint(path)
    return module


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_settings_round_trip_through_plain_values() -> None:
    d = SETTINGS.to_dict()
    assert d["model"]["hidden_size"] == 32 and d["noise_split"] == 2  # plain dicts, no objects
    assert ModuleSettings.from_dict(d) == SETTINGS
    assert ModuleSettings.from_legacy(_old_hparams(SETTINGS)) == SETTINGS
    with pytest.raises(AttributeError):
        SETTINGS.peak_lr = 1.0  # frozen: a module's settings do not drift after it is built


def test_the_module_takes_one_settings_object() -> None:
    module = CausalLMModule(SETTINGS)
    assert module.settings is SETTINGS
    assert module.hparams["settings"] == SETTINGS.to_dict()
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["lr"] == SETTINGS.peak_lr
    assert CausalLMModule(SETTINGS.to_dict()).settings == SETTINGS  # its dict, as saved


def test_wrong_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="needs settings"):
        CausalLMModule()
    with pytest.raises(TypeError, match="not both"):
        CausalLMModule(SETTINGS, peak_lr=1.0)
    with pytest.raises(TypeError, match="unexpected"):
        CausalLMModule(**_old_hparams(SETTINGS), peak_lr_typo=1.0)


def test_a_new_checkpoint_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "new.ckpt"
    trained = _trained_checkpoint(path)
    assert torch.load(path, weights_only=False)["hyper_parameters"] == {
        "settings": SETTINGS.to_dict()
    }
    loaded = CausalLMModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.settings == SETTINGS and _same_weights(loaded.model, trained.model)


def test_a_checkpoint_of_the_old_signature_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before ModuleSettings hold the ten flat keywords (model_cfg, optim_cfg,
    ..., noise_split_every): Lightning passes them to __init__, and evaluate's loader and
    load_from_checkpoint both rebuild the same module from them."""
    path = tmp_path / "old.ckpt"
    settings = replace(SETTINGS, model=replace(SETTINGS.model, arch="gpt2"))
    trained = _trained_checkpoint(path, settings)
    ckpt = torch.load(path, weights_only=False)
    ckpt["hyper_parameters"] = _old_hparams(settings)
    torch.save(ckpt, path)

    model = load_model(path, {"experiment": "small_batch", "run_id": "old"})
    assert _same_weights(model, trained.model)
    loaded = CausalLMModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.settings == settings


def test_a_damaged_checkpoint_is_an_upstream_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UpstreamError, match="does not load"):
        load_model(path, {"experiment": "small_batch", "seed": 0, "run_id": "bad"})


def _function_imports(path: Path) -> list[str]:
    """Imports inside functions (lazy ones), by line, in one module."""
    out = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    out.append(f"{path.name}:{node.lineno}")
    return out


def test_the_model_side_imports_at_the_top() -> None:
    """model.py, flops.py and checkpointing.py are only imported where training or evaluation
    runs, which loads torch, Lightning and transformers anyway: no lazy imports left there."""
    files = ("model.py", "flops.py", "checkpointing.py")
    assert [i for f in files for i in _function_imports(PACKAGE / f)] == []


def test_light_entry_points_do_not_import_the_model() -> None:
    """The bad-config path stays fast: importing the experiment dispatcher or the config loads
    neither the model module nor transformers."""
    code = (
        "import sys, batchsize_study.experiments, batchsize_study.config; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'transformers' or "
        "m in ('batchsize_study.model', 'batchsize_study.flops', 'batchsize_study.evaluate')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert_fresh_interpreter_runs(code)


def test_the_data_package_loads_torch_only_for_windows() -> None:
    """The encode pool's spawned workers import batchsize_study.data: it must not pull in torch
    or Lightning until a window class is asked for."""
    code = (
        "import sys, batchsize_study.data as d; "
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'eager'; "
        "d.prepare_corpus, d.train_bpe, d.Document; "
        "assert 'torch' not in sys.modules, 'light names'; "
        "d.TokenDataModule; assert 'torch' in sys.modules"
    )
    assert_fresh_interpreter_runs(code)
