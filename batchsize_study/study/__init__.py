"""One home for a study's records: files and the one envelope (:mod:`.records`), the declared
table of stages (:mod:`.stages`), the one selection of runs every consumer reads
(:mod:`.select`), and the x -> y -> z chain with provenance (:mod:`.chain`).

Layering: this package reads config, errors and stats; the analysis modules and the report read
it, never the reverse.
"""

from batchsize_study.study.chain import (
    LRChoice,
    Upstream,
    adam_sde_hparams,
    check_step_budget,
    derive_lr,
    find_small_batch,
    find_unstable_lr,
    large_batch_lr,
    precheck_upstream,
    small_batch_lr,
)
from batchsize_study.study.records import (
    ENVELOPE,
    EVALUATION,
    EVALUATION_LOSSES,
    FINAL_STATUSES,
    RECORD,
    beside,
    existing_record,
    make_run_id,
    read_records,
    run_name,
    runs_dir,
    stable_hash,
    write_bytes_atomic,
    write_json_atomic,
    write_record,
)
from batchsize_study.study.select import (
    Pair,
    Selection,
    models_of,
    select,
    select_records,
    upstream_ids,
)
from batchsize_study.study.stages import COMPARED, STAGES, Stage

__all__ = [
    "COMPARED",
    "ENVELOPE",
    "EVALUATION",
    "EVALUATION_LOSSES",
    "FINAL_STATUSES",
    "RECORD",
    "STAGES",
    "LRChoice",
    "Pair",
    "Selection",
    "Stage",
    "Upstream",
    "adam_sde_hparams",
    "beside",
    "check_step_budget",
    "derive_lr",
    "existing_record",
    "find_small_batch",
    "find_unstable_lr",
    "large_batch_lr",
    "make_run_id",
    "models_of",
    "precheck_upstream",
    "read_records",
    "run_name",
    "runs_dir",
    "select",
    "select_records",
    "small_batch_lr",
    "stable_hash",
    "upstream_ids",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_record",
]
