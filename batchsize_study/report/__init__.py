"""``experiment=compare``: a study's records and metrics.csv files -> aligned curves, figures, a
verdict, written to ``<study.dir>/report/`` (report.md, PNGs, comparison.json).

The seed's question is per optimizer step ("a lower loss in a given amount of steps"); the
compute-fair question is per token seen (the large batch sees B_large/B_small times more tokens
per step). Both are answered. At matched steps the validation loss is used where both runs have
it, a smoothed training loss otherwise. Several seeds per configuration give a mean and an
interval per step and a test across seeds at the final step; one seed gives a verdict that says
it rests on one seed.

Modules, in the order data flows: ``load`` (records and curves), ``compare`` (the numbers and
the verdict), ``figures`` (one figure style), ``sections`` (the ordered list of report sections),
``build`` (the entry points). The report reads config, stats, metrics, study records and the
pure analysis modules (ladder, probe_analysis); nothing here imports training.
"""

from batchsize_study.report.build import REPORT_DIR, build_report, run_compare
from batchsize_study.report.load import Group, Run, Study, load_study
from batchsize_study.report.sections import SECTIONS, ReportContext, Section

__all__ = [
    "REPORT_DIR",
    "SECTIONS",
    "Group",
    "ReportContext",
    "Run",
    "Section",
    "Study",
    "build_report",
    "load_study",
    "run_compare",
]
