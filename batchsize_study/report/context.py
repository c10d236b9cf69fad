"""What every report section is and gets: :class:`Section` (markdown, JSON, PNGs) and
:class:`ReportContext` (settings, output folder, earlier sections' results)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from batchsize_study.config import CompareConfig
from batchsize_study.report import figures
from batchsize_study.report.load import Study


@dataclass
class Section:
    """One part of the report: markdown for report.md, JSON for comparison.json[key], and the
    PNG files it wrote (names relative to the report folder)."""

    key: str
    title: str
    markdown: str
    data: Any = None
    plots: list[str] = field(default_factory=list)


@dataclass
class ReportContext:
    """What a section gets besides the study: settings, the output folder, and the results of
    earlier sections (by key), so a later section can reuse them."""

    out_dir: Path
    settings: CompareConfig
    results: dict[str, Any] = field(default_factory=dict)

    def save(self, fig: Figure, name: str) -> str:
        """Write a figure as PNG into the report folder; return its file name."""
        figures.save(fig, self.out_dir / name, self.settings.dpi)
        return name


SectionFn = Callable[[Study, ReportContext], "Section | None"]
