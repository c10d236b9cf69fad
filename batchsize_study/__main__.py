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
        sys.exit(2)
    loss = (
        record.get("final_val_loss") or record.get("final_train_loss")
        if isinstance(record, dict)
        else None
    )
    return float(loss) if loss is not None else None


_HYDRA_NOISE = (
    "full_key:",
    "object_type=",
    "Config search path",
    "provider=",
    "Set the environment",
)


def hydra_error_line(exc: BaseException) -> str:
    """One line for an error Hydra/OmegaConf raise while composing the config (unknown option,
    wrong type, unknown key), naming the key and the fix like the package's own errors."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        return f"{group}={name}: no such option; use one of {', '.join(exc.options)}"
    parts, seen = [], set()
    cause: BaseException | None = exc
    while cause is not None:
        for line in str(cause).splitlines():
            line = line.strip()
            if line and line not in seen and not line.startswith(_HYDRA_NOISE):
                seen.add(line)
                parts.append(line)
        key = getattr(cause, "full_key", None)
        if key:
            parts.insert(0, f"{key}:")
        cause = cause.__cause__
    return " ".join(parts) or type(exc).__name__


def cli() -> None:
    """``python -m batchsize_study``: also Hydra's composition errors end in one ``error:`` line
    and exit status 2, as the package's own errors do."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    user_set = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra re-raises instead of exiting 1
    try:
        main()
    except (HydraException, OmegaConfBaseException) as exc:
        if user_set:
            raise
        print(f"error: {hydra_error_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # Hydra creates its run folder under study.dir before any task runs
        if user_set or not exc.filename:
            raise
        print(
            f"error: study.dir: cannot write {exc.filename} ({exc.strerror}); choose a writable "
            "folder with study.dir=<path>",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    cli()
