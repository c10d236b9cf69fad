"""The experiment layer: ``run(cfg)`` validates the config and hands it to the stage it names.
This is where a DictConfig stops; every stage below takes the typed :class:`Config`.

    superconvergence, small_batch, large_batch -> training.train
    stability_probe                            -> probe.run_probe (several training runs)
    lr_sweep                                   -> sweep.run_sweep (one training run per LR)
    evaluate                                   -> evaluate.run_evaluate (saved models, test split)
    compare                                    -> report.run_compare (reads records only)

Each stage is imported only once its config is valid (and, for a training run, once the checks
that need no corpus have passed): a wrong key or an impossible batch split costs about a second,
not the ~15 s it takes to import Lightning, transformers and datasets on 2 cores.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from batchsize_study.config import Config, validate


def run(cfg: DictConfig | Config) -> dict[str, Any]:
    """Entry point of every experiment (called by ``__main__`` and by tests)."""
    c = validate(cfg)
    if c.task == "compare":
        from batchsize_study.report import run_compare
        from batchsize_study.runtime import study_dir

        return run_compare(study_dir(c), c.compare)
    if c.task == "stability_probe":
        from batchsize_study.probe import run_probe

        return run_probe(c)
    if c.task == "evaluate":
        from batchsize_study.evaluate import run_evaluate

        return run_evaluate(c)
    if c.task == "lr_sweep":
        from batchsize_study.sweep import run_sweep

        return run_sweep(c)
    from batchsize_study.runtime import precheck_run

    precheck_run(c)
    from batchsize_study.training import train

    return train(c)
