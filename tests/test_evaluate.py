"""experiment=evaluate: the saved models scored on the held-out test split.

Pure parts on synthetic records and losses; one smoke evaluation end to end on a copy of the
session's smoke study (so the shared study and its golden snapshot stay untouched)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_cfg, make_record

from batchsize_study.config import CompareConfig, EvaluateConfig
from batchsize_study.errors import ConfigError, UpstreamError
from batchsize_study.evaluate import (
    LOSSES_FILE,
    block_means,
    checkpoint_path,
    difference,
    load_test_windows,
    model_summary,
    prompts,
    select_pairs,
)
from batchsize_study.experiments import run
from batchsize_study.report import ReportContext
from batchsize_study.report.evaluation import evaluation_section
from batchsize_study.study import select

KEY = "k1"


def rec(exp: str, bs: int, seed: int, t: float, **kw: Any) -> dict[str, Any]:
    return make_record(exp, bs, seed, t, KEY, **kw)


# ---------------------------------------------------------------- pairing (pure)


def test_pairs_by_seed_and_names_what_is_left_out() -> None:
    records = [
        rec("superconvergence", 16, 0, 0.5, status="diverged"),
        rec("small_batch", 16, 0, 1),
        rec("small_batch", 16, 1, 2),
        rec("small_batch", 16, 0, 3),  # supersedes the first seed-0 run
        rec("large_batch", 64, 0, 4),
        rec("large_batch", 64, 2, 5),  # no small run with seed 2
        rec("large_batch", 64, 1, 6, compat_key="other"),  # another model: ignored
        rec("large_batch", 64, 1, 7, status="failed"),  # not completed: ignored
    ]
    pairs, notes = select_pairs(records, KEY, "/s")
    assert [(p.seed, p.small["finished_at"], p.large["finished_at"]) for p in pairs] == [(0, 3, 4)]
    text = " ".join(notes)
    assert "small_batch-bs16-seed0-1: superseded" in text
    assert "large_batch-bs64-seed2-5: no small_batch run (batch 16) with seed 2" in text
    assert "small_batch-bs16-seed1-2: no large_batch run with seed 1" in text


def test_every_large_batch_size_pairs_with_the_small_baseline() -> None:
    records = [
        rec("small_batch", 16, 0, 1),
        rec("small_batch", 16, 1, 2),
        rec("large_batch", 64, 0, 3),
        rec("large_batch", 64, 1, 4),
        rec("large_batch", 128, 0, 5),
    ]
    pairs, notes = select_pairs(records, KEY, "/s")
    assert [(p.large["batch_size"], p.seed) for p in pairs] == [(64, 0), (64, 1), (128, 0)]
    assert all(p.small["batch_size"] == 16 for p in pairs) and not notes


def test_nothing_to_evaluate_names_what_to_run() -> None:
    with pytest.raises(UpstreamError) as e:
        select_pairs([rec("superconvergence", 16, 0, 1, status="diverged")], KEY, "/s")
    msg = str(e.value)
    assert "\n" not in msg
    assert "no completed small_batch or large_batch record" in msg
    assert "experiment=superconvergence,small_batch,large_batch" in msg
    with pytest.raises(UpstreamError, match="no completed large_batch record"):
        select_pairs([rec("small_batch", 16, 0, 1)], KEY, "/s")


def test_records_of_another_model_are_named_as_such() -> None:
    records = [rec("small_batch", 16, 0, 1), rec("large_batch", 64, 0, 2)]
    with pytest.raises(UpstreamError, match="another model or corpus"):
        select_pairs(records, "different-key", "/s")


def test_no_common_seed_says_which_seed_to_run() -> None:
    records = [rec("small_batch", 16, 0, 1), rec("large_batch", 64, 3, 2)]
    with pytest.raises(UpstreamError, match=r"seeds \[0\].*seeds \[3\].*seed=0"):
        select_pairs(records, KEY, "/s")


def test_a_missing_checkpoint_is_named_with_the_fix(tmp_path: Path) -> None:
    r = rec("large_batch", 64, 0, 1, checkpoint=str(tmp_path / "gone.ckpt"))
    r["_path"] = str(tmp_path / "runs" / "x" / "result.json")
    with pytest.raises(UpstreamError) as e:
        checkpoint_path(r)
    assert "gone.ckpt" in str(e.value) and "experiment=large_batch seed=0 force=true" in str(
        e.value
    )
    moved = tmp_path / "runs" / "x" / "checkpoints" / "last.ckpt"  # a moved study folder
    moved.parent.mkdir(parents=True)
    moved.write_bytes(b"x")
    assert checkpoint_path(r) == moved


# ---------------------------------------------------------------- statistics (pure)


def test_block_means_drop_the_partial_block() -> None:
    assert block_means(np.arange(10.0), 4).tolist() == [1.5, 5.5]


def test_model_summary_flags_a_too_large_se() -> None:
    rng = np.random.default_rng(0)
    noisy = model_summary(rng.normal(5.0, 1.0, 400), 0.01)  # se ~ 0.05
    assert noisy["se_ok"] is False and noisy["test_loss_se"] == pytest.approx(0.05, rel=0.2)
    assert noisy["test_ppl"] == pytest.approx(np.exp(noisy["test_loss"]))
    assert model_summary(rng.normal(5.0, 0.1, 400), 0.01)["se_ok"] is True


def test_difference_pairs_windows_and_finds_a_shift_smaller_than_the_spread() -> None:
    """Windows vary by 1 nat in difficulty, the large model is 0.05 lower on each: unpaired the
    shift would drown in the spread; paired it is resolved."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(5.0, 1.0, 2000)
    small = difficulty + rng.normal(0, 0.05, 2000)
    large = difficulty - 0.05 + rng.normal(0, 0.05, 2000)
    s = EvaluateConfig(bootstrap_resamples=2000, block_windows=8)
    d = difference([small], [large], [0], s)
    assert d["mean_difference"] == pytest.approx(-0.05, abs=0.005)
    assert d["large_lower"] and not d["large_higher"]
    lo, hi = d["interval"]
    assert lo < -0.05 < hi < 0
    assert d["per_seed"][0]["windows"]["n"] == 2000
    assert d["pooled"]["blocks"]["n"] == 250
    assert d["across_seeds"] is None  # one seed: no test across seeds
    again = difference([small], [large], [0], s)
    assert again["interval"] == d["interval"]  # seeded: the same interval every time


def test_difference_without_a_shift_is_undecided_and_seeds_pool() -> None:
    rng = np.random.default_rng(2)
    difficulty = rng.normal(5.0, 1.0, 500)
    smalls = [difficulty + rng.normal(0, 0.05, 500) for _ in range(2)]
    larges = [difficulty + rng.normal(0, 0.05, 500) for _ in range(2)]
    d = difference(smalls, larges, [0, 1], EvaluateConfig(bootstrap_resamples=1000))
    assert not d["large_lower"] and not d["large_higher"]
    assert d["interval"][0] < 0 < d["interval"][1]
    assert len(d["per_seed"]) == 2 and d["across_seeds"]["n_seeds"] == 2
    pooled = np.mean(larges, axis=0) - np.mean(smalls, axis=0)
    assert d["mean_difference"] == pytest.approx(pooled.mean())


def test_windows_and_prompts_come_from_the_token_file(tmp_path: Path) -> None:
    path = tmp_path / "test.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    w = load_test_windows(str(path), "uint16", 8, None)
    assert w.shape == (12, 9) and w[1].tolist() == list(range(8, 17))  # as TokenWindows cuts
    assert load_test_windows(str(path), "uint16", 8, 5).shape == (5, 9)
    ps = prompts(w, 3, 4)
    assert [p.tolist() for p in ps] == [[0, 1, 2, 3], [48, 49, 50, 51], [88, 89, 90, 91]]


@pytest.mark.parametrize(
    "key,value",
    [
        ("max_windows", 1),
        ("batch_size", 0),
        ("max_se", 0.0),
        ("confidence", 1.0),
        ("bootstrap_resamples", 10),
        ("block_windows", 0),
        ("samples", -1),
        ("sample_tokens", 0),
        ("temperature", -0.5),
    ],
)
def test_bad_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        EvaluateConfig(**{key: value})
    assert e.value.key == f"evaluate.{key}"


# ---------------------------------------------------------------- end to end (smoke)


@pytest.fixture
def study_copy(smoke_study: Path, tmp_path: Path) -> Path:
    """The session's smoke study copied, its records pointing at the copy's files."""
    dst = tmp_path / "study"
    shutil.copytree(smoke_study, dst, ignore=shutil.ignore_patterns("report", "hydra"))
    for p in (dst / "runs").glob("*/result.json"):
        p.write_text(p.read_text().replace(str(smoke_study), str(dst)))
    return dst


def _files(sdir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(sdir)): p.read_bytes() for p in sorted(sdir.rglob("*")) if p.is_file()
    }


SMOKE_EVAL = ("experiment=evaluate", "precision=32-true", "evaluate.sample_tokens=8")


def test_smoke_evaluation_end_to_end(study_copy: Path, tmp_path: Path) -> None:
    before = _files(study_copy)
    r = run(make_cfg(study_copy, *SMOKE_EVAL))
    assert r["experiment"] == "evaluate" and r["status"] == "completed"
    run_dir = Path(r["_path"]).parent
    assert run_dir.name.startswith("evaluate-")
    after = _files(study_copy)
    added = sorted(set(after) - set(before))
    assert added == [f"runs/{run_dir.name}/{LOSSES_FILE}", f"runs/{run_dir.name}/result.json"]
    assert all(after[k] == v for k, v in before.items())  # wrote only its own run folder

    # one small and one large model, seed 0, scored on the same windows
    assert [m["experiment"] for m in r["models"]] == ["small_batch", "large_batch"]
    n = r["test_split"]["windows"]
    assert n >= 2 and r["test_split"]["tokens_scored"] == n * 32
    with np.load(run_dir / LOSSES_FILE) as z:
        losses = z["losses"]
        assert losses.shape == (2, n) and np.isfinite(losses).all()
        assert list(z["run_ids"]) == [m["run_id"] for m in r["models"]]
    for m, row in zip(r["models"], losses, strict=True):
        assert m["test_loss"] == pytest.approx(row.mean())
        assert m["test_ppl"] == pytest.approx(np.exp(row.mean()))
        assert len(m["samples"]) == 3 and all(s["continuation"] for s in m["samples"])
        assert all(s["prompt"] and len(s["prompt"]) < 400 for s in m["samples"])
    (cmp,) = r["comparisons"]
    assert cmp["mean_difference"] == pytest.approx((losses[1] - losses[0]).mean())
    assert cmp["interval"][0] <= cmp["mean_difference"] <= cmp["interval"][1]
    assert cmp["seeds"] == [0] and "seed 0" in cmp["text"]
    # the smoke test split is far too small for the 0.01-nat target: said loudly
    assert r["test_split_too_small"] == (r["max_test_loss_se"] >= 0.01)
    if r["test_split_too_small"]:
        assert r["message"].startswith("TEST SPLIT TOO SMALL")

    # deterministic for a fixed config: a forced re-run gives the same losses and samples
    again = run(make_cfg(study_copy, *SMOKE_EVAL, "force=true"))
    with np.load(run_dir / LOSSES_FILE) as z:
        assert np.array_equal(z["losses"], losses)
    assert [m["samples"] for m in again["models"]] == [m["samples"] for m in r["models"]]
    assert again["comparisons"][0]["interval"] == cmp["interval"]

    # the report section renders, figure included
    out = tmp_path / "report"
    out.mkdir()
    sec = evaluation_section(select(study_copy), ReportContext(out, CompareConfig()))
    md, data = sec.markdown, sec.data
    assert sec.title == "The saved models on the test split" and f"{n:,} windows" in md
    assert "⟶" in md and data["run_id"] == again["run_id"] and data["of_compared_runs"]
    assert len(sec.plots) == 1 and (out / sec.plots[0]).stat().st_size > 1000
    if r["test_split_too_small"]:
        assert "**Warning: TEST SPLIT TOO SMALL" in md


def test_evaluate_refuses_a_missing_checkpoint_and_keeps_what_was_written(
    study_copy: Path,
) -> None:
    r = run(make_cfg(study_copy, "experiment=evaluate", "precision=32-true", "evaluate.samples=0"))
    kept = _files(study_copy)
    large = next(m for m in r["models"] if m["experiment"] == "large_batch")
    Path(large["checkpoint"]).unlink()
    del kept[str(Path(large["checkpoint"]).relative_to(study_copy))]
    cfg = make_cfg(
        study_copy, "experiment=evaluate", "precision=32-true", "evaluate.samples=0", "force=true"
    )
    with pytest.raises(UpstreamError) as e:
        run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "last.ckpt" in msg and "saved model is missing" in msg
    assert "experiment=large_batch seed=0 force=true" in msg
    assert _files(study_copy) == kept  # the earlier evaluation and every record untouched


def test_evaluate_on_an_empty_study_names_the_chain(tmp_path: Path) -> None:
    with pytest.raises(UpstreamError) as e:
        run(make_cfg(tmp_path / "empty", "experiment=evaluate"))
    assert "experiment=superconvergence,small_batch,large_batch" in str(e.value)
    assert not (tmp_path / "empty" / "runs").exists()  # nothing written


# ---------------------------------------------------------------- generation (issue 19)


def _tiny_lm(arch: str, context: int = 16, vocab: int = 97):  # noqa: ANN202 - an HF model
    """A small random causal LM built the way training builds one."""
    import torch

    from batchsize_study.config import ModelConfig
    from batchsize_study.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, seq_len=context)
    return build_model(cfg, vocab).eval()


def _loop_generate(model, prompt: np.ndarray, n_tokens: int, context: int) -> list[int]:  # noqa: ANN001
    """The hand-written greedy loop evaluate.generate replaced (one full forward per token over
    the last ``context`` tokens, no cache): the reference for its tokens."""
    import torch

    ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64))[None, :]
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(n_tokens):
            logits = model(input_ids=ids[:, -context:]).logits[0, -1].float()
            nxt = int(torch.argmax(logits))
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_is_the_old_loops_tokens(arch: str) -> None:
    """model.generate with its KV cache picks the same greedy tokens as the old O(n^2) loop
    wherever prompt + new tokens fit the context."""
    from batchsize_study.evaluate import generate

    model = _tiny_lm(arch, context=16)
    prompt = np.arange(3, 9)
    for n in (1, 5, 10):
        assert generate(model, prompt, n, 16) == _loop_generate(model, prompt, n, 16)
    # a prompt too long for prompt + n: its front is cropped, as the loop crops its input
    long_prompt = np.arange(40) % 97
    assert generate(model, long_prompt, 4, 16) == _loop_generate(model, long_prompt[-12:], 4, 16)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_past_the_context_slides_and_stays_inside_it(arch: str) -> None:
    """More new tokens than the context holds: every call stays within the trained positions
    (GPT-2 has no position embedding past them) and the continuation has the asked length."""
    from batchsize_study.evaluate import generate

    model = _tiny_lm(arch, context=8)
    seen: list[int] = []
    forward = model.forward

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        # generate widens the attention mask by one per token: its width = positions so far
        seen.append(kwargs["attention_mask"].shape[1])
        return forward(*args, **kwargs)

    model.forward = spy
    out = generate(model, np.arange(1, 13), 30, 8)
    assert len(out) == 30 and all(0 <= t < 97 for t in out)
    assert seen and max(seen) <= 8


def test_sampled_generation_is_seeded_and_leaves_the_global_rng_alone() -> None:
    import torch

    from batchsize_study.evaluate import generate

    model = _tiny_lm("llama")
    prompt = np.arange(5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(model, prompt, 12, 16, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, prompt, 12, 16, temperature=1.0, seed=7) == a
    others = {tuple(generate(model, prompt, 12, 16, temperature=1.0, seed=s)) for s in range(4)}
    assert len(others) > 1  # the seed is what picks the sample


def test_generation_logs_no_pad_or_eos_warning() -> None:
    import logging
    import warnings

    from batchsize_study.evaluate import generate

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    hf_log = logging.getLogger("transformers")
    hf_log.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for arch in ("llama", "gpt2"):
                model = _tiny_lm(arch)
                generate(model, np.arange(4), 6, 16)
                generate(model, np.arange(4), 6, 16, temperature=0.8)
    finally:
        hf_log.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
