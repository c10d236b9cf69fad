"""``python -m batchsize_study experiment=<superconvergence|small_batch|large_batch|compare>``.

The Hydra app lives here (not in a submodule) so that ``config_path`` resolves to the repo's
``conf/`` folder. Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from batchsize_study.config import register_schema
from batchsize_study.errors import UserError

register_schema()
log = logging.getLogger("batchsize_study")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one experiment; return its final loss (for Hydra sweepers that optimise)."""
    from batchsize_study.experiments import run

    try:
        record = run(cfg)
    except UserError as exc:
        log.error("error: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.stdout.flush()
        os._exit(2) if os.environ.get("BATCHSIZE_STUDY_HARD_EXIT") else sys.exit(2)
    loss = (
        record.get("final_val_loss") or record.get("final_train_loss")
        if isinstance(record, dict)
        else None
    )
    return float(loss) if loss is not None else None


if __name__ == "__main__":
    main()
