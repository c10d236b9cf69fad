"""The report says how far y may sit from the best LR at the study's own size (issue 21, item 2):
inside the checked range it quotes the measured gaps, outside it says the gap is not measured
and what to run, and a study with its own sweep is pointed at it."""

from __future__ import annotations

from batchsize_study.report.evidence import CHECKED, OUTSIDE, checked_table, rule_evidence


def test_the_default_size_is_inside_and_quotes_the_measured_gaps():
    default = CHECKED[0]
    ev = rule_evidence(default.flops_per_token, 300, own_sweep=False)
    assert not ev["outside"] and "inside that range" in ev["note"]
    lo, hi = ev["y_gap_range"]
    assert lo <= min(c.y_gap[0] for c in CHECKED) and hi >= max(c.y_gap[1] for c in CHECKED)
    assert f"{hi:+.3f}" in ev["note"] and "docs/lr_sweep.md" in ev["note"]


def test_a_gpt2_sized_study_is_told_the_gap_is_not_measured_and_what_to_run():
    top = max(c.flops_per_token for c in CHECKED)
    ev = rule_evidence(750e6, 300, own_sweep=False)  # GPT-2 124M at seq 1024: ~0.75 GFLOPs
    assert ev["outside"]
    assert f"{750e6 / top:.1f}x outside" in ev["note"]
    assert "not measured" in ev["note"] and "experiment=lr_sweep" in ev["note"]
    # just inside the tolerance is inside; a run length far beyond is outside on its own
    assert not rule_evidence(top * OUTSIDE * 0.99, 300, False)["outside"]
    long = rule_evidence(CHECKED[0].flops_per_token, 20_000, False)
    assert long["outside"] and "20,000 steps" in long["note"]


def test_the_note_states_the_drift_and_the_table_lists_every_setting():
    ev = rule_evidence(CHECKED[0].flops_per_token, 300, own_sweep=False)
    assert "fell from 0.44·x to 0.22·x as the FLOPs per token grew 4.2x" in ev["note"]
    table = checked_table().splitlines()
    assert len(table) == 2 + len(CHECKED) and all(r.count("|") == 9 for r in table)


def test_a_study_with_its_own_sweep_is_pointed_at_it():
    ev = rule_evidence(750e6, 300, own_sweep=True)
    assert "its own small-batch LR sweep" in ev["note"] and "not measured" not in ev["note"]
