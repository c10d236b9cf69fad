"""Shared fixtures: the real Hydra config, composed small; a per-session token cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from batchsize_study.config import register_schema

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

register_schema()


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Offline everything; one token cache for the session (smoke corpora build in seconds)."""
    os.environ["BATCHSIZE_STUDY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def make_cfg(study_dir: str | os.PathLike, *overrides: str, smoke: bool = True) -> DictConfig:
    """Compose conf/ as the command line would, with debug=smoke and CSV logging by default."""
    base = [f"study.dir={study_dir}", "logger=csv", "trainer.enable_progress_bar=false"]
    if smoke:
        base.insert(0, "debug=smoke")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])


@pytest.fixture
def cfg_factory(tmp_path: Path):
    def factory(*overrides: str, smoke: bool = True, study_dir: Path | None = None) -> DictConfig:
        return make_cfg(study_dir or tmp_path / "study", *overrides, smoke=smoke)

    return factory


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke study (superconvergence -> small_batch -> large_batch, CSV logging, fp32 so its
    numbers are exact), built once per test session in-process; tests that only read it
    (compare, the notebook, the snapshot) share it."""
    from batchsize_study.experiments import run

    sdir = tmp_path_factory.mktemp("smoke_study")
    for exp in ("superconvergence", "small_batch", "large_batch"):
        rec = run(make_cfg(sdir, f"experiment={exp}", "precision=32-true"))
        assert rec["status"] in ("completed", "diverged"), rec.get("message")
    return sdir


def make_record(exp: str, bs: int, seed: int, t: float, key: str = "k1", **kw) -> dict:
    """A record as read_records returns it (with ``_path``), for the selection's pure tests."""
    r = {
        "experiment": exp,
        "status": "completed",
        "batch_size": bs,
        "seed": seed,
        "compat_key": key,
        "finished_at": t,
        "max_steps": 40,
        "lr": 0.01,
        "run_id": f"{exp}-bs{bs}-seed{seed}-{t:g}",
        "_path": f"/s/runs/{exp}-bs{bs}-seed{seed}-{t:g}/result.json",
    }
    if exp == "large_batch":
        r["derivation"] = {"small_batch_size": 16}
    r.update(kw)
    return r
