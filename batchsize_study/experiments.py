"""The experiment layer: ``run(cfg)`` validates the config and hands it to the stage it names.
This is where a DictConfig stops; every stage below takes the typed :class:`Config`.

    superconvergence, small_batch, large_batch -> training.train
    stability_probe                            -> probe.run_probe (several training runs)
    lr_sweep                                   -> sweep.run_sweep (one training run per LR)
    evaluate                                   -> evaluate.run_evaluate (saved models, test split)
    compare                                    -> experiments.compare -> report.run_compare

(the ``entry`` column of batchsize_study.study.stages.STAGES).

Each stage is imported only once its config is valid (and, for a training run, once the checks
that need no corpus have passed): a wrong key or an impossible batch split costs about a second,
not the ~15 s it takes to import Lightning, transformers and datasets on 2 cores.
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig

from batchsize_study.config import Config, validate
from batchsize_study.study.stages import STAGES


def run(cfg: DictConfig | Config) -> dict[str, Any]:
    """Entry point of every experiment (called by ``__main__`` and by tests): the stage table
    (batchsize_study.study.stages) names the function that runs it."""
    c = validate(cfg)
    stage = STAGES[c.task]
    if stage.entry == "batchsize_study.training:train":
        from batchsize_study.runtime import precheck_run  # torch: only for a training run

        precheck_run(c)  # the corpus-free checks, before Lightning loads
    module, _, name = stage.entry.partition(":")
    return getattr(importlib.import_module(module), name)(c)


def compare(c: Config) -> dict[str, Any]:
    """``experiment=compare``: the report of the study folder (reads records only)."""
    from batchsize_study.report import run_compare
    from batchsize_study.runtime import study_dir
    from batchsize_study.wandb_results import log_compare

    comparison = run_compare(study_dir(c), c.compare)
    log_compare(c, comparison)  # the results as the study's compare run, when wandb is on
    return comparison
