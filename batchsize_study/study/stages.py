"""The one declared table of stages: what each experiment trains, keeps, measures, stops on,
how its peak LR is chosen, and which record kinds it writes.

Code asks the table (``STAGES[c.task].keeps_model``) instead of testing experiment names; adding
an experiment means a row here and its own module.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPERCONVERGENCE = "superconvergence"
SMALL_BATCH = "small_batch"
LARGE_BATCH = "large_batch"
STABILITY_PROBE = "stability_probe"
LR_SWEEP = "lr_sweep"
EVALUATE = "evaluate"
COMPARE = "compare"

LR_SWEEP_SUMMARY = "lr_sweep_summary"
PROBE_SUMMARY = "stability_probe_summary"

COMPARED = (SMALL_BATCH, LARGE_BATCH)
"""The two sides of the verdict, in order."""


@dataclass(frozen=True)
class Stage:
    """One experiment (``experiment=<name>``)."""

    name: str
    entry: str
    """``module:function`` that runs it (imported only once the config is valid)."""
    trains: bool
    """Runs batchsize_study.training.train for its runs (writes metrics.csv)."""
    lr_rule: str
    """How its peak LR is chosen (the record's ``lr_source`` says it per run)."""
    writes: tuple[str, ...]
    """Record kinds (``experiment`` field) it writes."""
    keeps_model: bool = False
    """Saves checkpoints/last.ckpt for evaluate."""
    measures_noise: bool = False
    """Estimates the gradient noise scale on the way (McCandlish et al. 2018)."""
    stops_on_rise: bool = False
    """The destabilisation detector ends the run at the onset and x is recorded."""
    failure_is_answer: bool = False
    """A detected destabilisation is this stage's measurement, not a failed run."""
    final_validation: bool = False
    """Validates after the last step even off the validation cadence (its answer is the final
    val loss)."""
    needs: str | None = None
    """The record kind its LR derives from (unless ``lr`` is given)."""
    record_field: str | None = None
    """A derivation field copied to the top of its record (a probe's multiple, a sweep's)."""


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            SUPERCONVERGENCE,
            "batchsize_study.training:train",
            trains=True,
            lr_rule="given: the too-high warmup target (lr)",
            writes=(SUPERCONVERGENCE,),
            stops_on_rise=True,
        ),
        Stage(
            SMALL_BATCH,
            "batchsize_study.training:train",
            trains=True,
            lr_rule="y = lr_factor * x",
            writes=(SMALL_BATCH,),
            keeps_model=True,
            measures_noise=True,
            final_validation=True,
            needs=SUPERCONVERGENCE,
        ),
        Stage(
            LARGE_BATCH,
            "batchsize_study.training:train",
            trains=True,
            lr_rule="z = y * (B_large / B_small) ** alpha",
            writes=(LARGE_BATCH,),
            keeps_model=True,
            measures_noise=True,
            final_validation=True,
            needs=SMALL_BATCH,
        ),
        Stage(
            STABILITY_PROBE,
            "batchsize_study.probe:run_probe",
            trains=True,
            lr_rule="given: stability probe, lr = multiple * x",
            writes=(STABILITY_PROBE, PROBE_SUMMARY),
            failure_is_answer=True,
            record_field="probe_multiple",
        ),
        Stage(
            LR_SWEEP,
            "batchsize_study.sweep:run_sweep",
            trains=True,
            lr_rule="given: lr sweep grid point",
            writes=(LR_SWEEP, LR_SWEEP_SUMMARY),
            failure_is_answer=True,
            final_validation=True,
            record_field="sweep_multiple",
        ),
        Stage(
            EVALUATE,
            "batchsize_study.evaluate:run_evaluate",
            trains=False,
            lr_rule="none: scores saved models",
            writes=(EVALUATE,),
        ),
        Stage(
            COMPARE,
            "batchsize_study.experiments:compare",
            trains=False,
            lr_rule="none: reads the study",
            writes=(),
        ),
    )
}
"""Every experiment, by name (the config's ``task``)."""
