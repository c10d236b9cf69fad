"""The report's entry points: :func:`build_report` (a study folder -> ``report/``) and
:func:`run_compare` (``experiment=compare``: the same, plus the verdict in the log)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from batchsize_study.config import CompareConfig
from batchsize_study.report.load import load_study
from batchsize_study.report.sections import SECTIONS, ReportContext, SectionFn
from batchsize_study.stats import json_safe
from batchsize_study.study import write_json_atomic

log = logging.getLogger("batchsize_study.report")

REPORT_DIR = "report"


def build_report(
    study_dir: str | Path,
    settings: CompareConfig | None = None,
    sections: Sequence[SectionFn] = SECTIONS,
) -> dict[str, Any]:
    """Load the study, run every section, write report/ (report.md, PNGs, comparison.json).
    Only ``<study_dir>/report/`` is written."""
    s = settings or CompareConfig()
    study = load_study(study_dir, s.ema)
    out = study.dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # no stale plot from an earlier report
        old.unlink()
    ctx = ReportContext(out, s)
    built = [sec for fn in sections if (sec := fn(study, ctx)) is not None]
    md = [f"# Batch size study: {study.dir.name}", "", f"Study folder: `{study.dir}`", ""]
    for sec in built:
        md += [f"## {sec.title}", "", sec.markdown, ""]
    (out / "report.md").write_text("\n".join(md))
    comparison: dict[str, Any] = {
        "study_dir": str(study.dir),
        "settings": {f.name: getattr(s, f.name) for f in fields(s)},
        "plots": [p for sec in built for p in sec.plots],
        "sections": [sec.key for sec in built],
    }
    comparison.update({sec.key: sec.data for sec in built})
    write_json_atomic(out / "comparison.json", json_safe(comparison))
    return comparison


def run_compare(study_dir: str | Path, settings: CompareConfig) -> dict[str, Any]:
    """``experiment=compare``: write ``<study_dir>/report/`` and log the verdict."""
    comparison = build_report(study_dir, settings)
    out = Path(comparison["study_dir"]) / REPORT_DIR
    for comp in comparison["verdict"]["comparisons"]:
        log.info("%s", comp["text"].replace("**", ""))
    log.info("report: %s (%d plots)", out / "report.md", len(comparison["plots"]))
    return comparison
