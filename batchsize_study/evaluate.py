"""Are the saved models better on text they never saw? ``experiment=evaluate``.

The seed saves the small- and large-batch models "for further testing". This step loads each
completed small_batch and large_batch checkpoint of the study (same model and corpus, seeds
paired) and scores it on the *test* split, which is held out by document hash and never read by
training or validation (data.py). Every model is scored on the same windows, so per-window
losses are paired:

* each model's test loss is the mean over windows of the window's mean next-token cross-entropy,
  with its standard error sd / sqrt(n) (``stats.mean_se``); perplexity is exp(test loss). The
  split must be large enough that this SE is below ``evaluate.max_se`` (0.01 nats); when it is
  not, the record and the report say so.
* large minus small: a paired percentile bootstrap over windows (``stats.paired_bootstrap``;
  Efron & Tibshirani 1993, ch. 13), per seed and pooled over seeds (the per-window difference
  averaged over seeds), so even one seed carries an interval. Adjacent windows of one document
  are correlated, which an i.i.d. bootstrap ignores; the same bootstrap over means of
  ``block_windows`` consecutive windows (batch means) is reported beside it, and the verdict
  uses the wider of the two. With two or more seeds, a paired t-test across seeds is added
  (``stats.paired_test``): the window interval says how well the test split pins the difference
  for these models, not how much it varies between seeds.
* a few generated samples per model, continuing fixed prompts cut from the test split (greedy by
  default), decoded with the corpus tokenizer.

The run writes only its own folder: ``runs/evaluate-<hash>/result.json`` and
``per_window_losses.npz``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import GenerationConfig

from batchsize_study.config import Config, EvaluateConfig
from batchsize_study.data import prepare_corpus
from batchsize_study.errors import DataError, UpstreamError
from batchsize_study.model import CausalLMModule
from batchsize_study.runtime import (
    check_writable,
    compat_key,
    resolve_precision,
    study_dir,
    uses_cuda,
)
from batchsize_study.stats import json_safe, mean_se, paired_bootstrap, paired_test
from batchsize_study.study import (
    COMPARED,
    RECORD,
    Pair,
    models_of,
    read_records,
    run_name,
    runs_dir,
    select_records,
    stable_hash,
    write_bytes_atomic,
    write_record,
)
from batchsize_study.study import EVALUATION as EXPERIMENT
from batchsize_study.study import EVALUATION_LOSSES as LOSSES_FILE

log = logging.getLogger("batchsize_study")


# ---------------------------------------------------------------- which models (pure)


def select_pairs(
    records: list[dict[str, Any]], compat_key: str, study_dir: str
) -> tuple[list[Pair], list[str]]:
    """(pairs, notes) of the study's one selection (batchsize_study.study.select) for this
    model and corpus: the runs the verdict compares, and what was left out.

    Raises UpstreamError (one line, what to run) when there is nothing to pair.
    """
    sel = select_records(records, study_dir, compat_key)
    if sel.pairs:
        return sel.pairs, sel.ignored
    trained = [r for r in records if r.get("experiment") in COMPARED]
    done = [r for r in trained if r.get("status") == "completed"]
    chain = (
        "`python -m batchsize_study -m experiment=superconvergence,small_batch,large_batch "
        f"study.dir={study_dir}`"
    )
    missing = [e for e, have in zip(COMPARED, (sel.small, sel.large)) if not have]
    if missing and any(r["experiment"] in missing for r in done):
        raise UpstreamError(
            f"study.dir={study_dir}: the completed {' and '.join(missing)} records are of another "
            "model or corpus than this evaluate run; run evaluate with the same model=, data= and "
            "debug= settings as the training runs"
        )
    if missing:
        found = ", ".join(f"{r['experiment']}:{r.get('status')}" for r in trained) or "none"
        raise UpstreamError(
            f"study.dir={study_dir}: no completed {' or '.join(missing)} record to evaluate "
            f"(found: {found}); run {chain} first"
        )
    small_seeds = sorted(sel.small)
    large_seeds = sorted({s for g in sel.large.values() for s in g})
    raise UpstreamError(
        f"study.dir={study_dir}: no seed has both a completed small_batch (batch "
        f"{sel.small_batch}, seeds {small_seeds}) and large_batch run (seeds {large_seeds}); run "
        f"large_batch with seed={small_seeds[0]} (or small_batch with the large run's seed) first"
    )


def checkpoint_path(rec: dict[str, Any]) -> Path:
    """The record's saved model: its recorded path, else ``checkpoints/last.ckpt`` beside its
    result.json (a study folder that was moved or copied). UpstreamError when neither exists."""
    tried = []
    if rec.get("checkpoint"):
        tried.append(Path(rec["checkpoint"]))
    if rec.get("_path"):
        tried.append(Path(rec["_path"]).parent / "checkpoints" / "last.ckpt")
    for p in tried:
        if p.is_file():
            return p
    where = " or ".join(str(p) for p in tried) or "no checkpoint recorded"
    raise UpstreamError(
        f"{rec.get('experiment')} run {run_name(rec)}: its saved model is missing ({where}); "
        f"restore the file, or re-train it with `python -m batchsize_study "
        f"experiment={rec.get('experiment')} seed={rec.get('seed')} force=true` (same study.dir)"
    )


# ---------------------------------------------------------------- statistics (pure)


def block_means(x: np.ndarray, k: int) -> np.ndarray:
    """Means of consecutive blocks of ``k`` values (a trailing partial block is dropped): the
    batch-means device for correlated series (e.g. Geyer 1992, "Practical Markov Chain Monte
    Carlo", Sec. 3.2)."""
    x = np.asarray(x, dtype=float)
    n = len(x) // k * k
    return x[:n].reshape(-1, k).mean(axis=1)


def model_summary(losses: np.ndarray, max_se: float) -> dict[str, Any]:
    """Test loss (mean over windows), its SE, perplexity exp(loss), and whether the SE meets the
    target."""
    mean, se = mean_se(losses)
    return {
        "test_loss": mean,
        "test_loss_se": se,
        "test_ppl": math.exp(min(mean, 50.0)) if math.isfinite(mean) else None,
        "se_ok": bool(se < max_se),
    }


def difference(
    small: list[np.ndarray],
    large: list[np.ndarray],
    seeds: list[int],
    s: EvaluateConfig,
) -> dict[str, Any]:
    """Large minus small on the same windows: per seed and pooled (per-window difference averaged
    over seeds), each a paired bootstrap over windows and over blocks of windows; with two or
    more seeds also a paired t-test across seeds. The verdict reads the wider pooled interval."""

    def both(a: np.ndarray, b: np.ndarray, seed: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "windows": paired_bootstrap(a, b, s.confidence, s.bootstrap_resamples, seed)
        }
        if s.block_windows > 1 and len(a) // s.block_windows >= 2:
            out["blocks"] = paired_bootstrap(
                block_means(a, s.block_windows),
                block_means(b, s.block_windows),
                s.confidence,
                s.bootstrap_resamples,
                seed,
            )
            out["blocks"]["block_windows"] = s.block_windows
        else:
            out["blocks"] = None
        return out

    per_seed = [
        {"seed": seed, **both(a, b, seed)} for seed, a, b in zip(seeds, small, large, strict=True)
    ]
    pooled = both(np.mean(small, axis=0), np.mean(large, axis=0), 0)
    chosen = max(
        (iv for iv in (pooled["windows"], pooled["blocks"]) if iv is not None),
        key=lambda iv: iv["high"] - iv["low"],
    )
    seed_diffs = [float(np.mean(b) - np.mean(a)) for a, b in zip(small, large, strict=True)]
    return {
        "seeds": seeds,
        "per_seed": per_seed,
        "pooled": pooled,
        "interval": [chosen["low"], chosen["high"]],
        "interval_from": "blocks" if chosen is pooled["blocks"] else "windows",
        "mean_difference": pooled["windows"]["mean"],
        "large_lower": bool(chosen["high"] < 0),
        "large_higher": bool(chosen["low"] > 0),
        "seed_differences": seed_diffs,
        "across_seeds": paired_test(seed_diffs, s.confidence),
    }


def verdict_sentence(d: dict[str, Any], b_small: int, b_large: int, level: float) -> str:
    """One sentence: large minus small on the test split, with its interval and what it says."""
    lo, hi = d["interval"]
    seeds = d["seeds"]
    who = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds pooled"
    head = (
        f"test loss, batch {b_large} minus batch {b_small}: {d['mean_difference']:+.4f} nats "
        f"[{lo:+.4f}, {hi:+.4f}] ({level:.0%} paired bootstrap over test "
        f"{d['interval_from']}, {who})"
    )
    if d["large_lower"]:
        tail = "the large batch is lower on held-out text"
    elif d["large_higher"]:
        tail = "the large batch is higher on held-out text"
    else:
        tail = "the interval includes 0: the test split does not separate the two"
    if len(seeds) == 1:
        tail += " (one seed: the interval is over test windows, not over training seeds)"
    return f"{head}: {tail}"


# ---------------------------------------------------------------- scoring


def load_test_windows(path: str, dtype: str, seq_len: int, max_windows: int | None) -> np.ndarray:
    """The test split as non-overlapping windows of ``seq_len + 1`` tokens (as training cuts its
    windows), the first ``max_windows`` of them: an int64 array [windows, seq_len + 1]."""
    data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    n = max(0, (len(data) - 1) // seq_len)
    if max_windows is not None:
        n = min(n, max_windows)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.asarray(data[idx], dtype=np.int64) if n else np.zeros((0, seq_len + 1), np.int64)


def _device(accelerator: str | None) -> torch.device:
    """Evaluate where Lightning would train with this ``trainer.accelerator``."""
    if uses_cuda(accelerator):
        return torch.device("cuda")
    return torch.device("cpu")


def prepare_model(
    model: torch.nn.Module, precision: str, device: torch.device
) -> tuple[torch.nn.Module, Any]:
    """The model on ``device`` in eval mode, and a factory of the autocast context for
    ``precision`` (Lightning's names): *-mixed autocasts, *-true casts the weights."""
    model = model.to(device).eval()
    half = torch.bfloat16 if precision.startswith("bf16") else None
    if precision.startswith("16"):
        half = torch.float16
    if precision.startswith("64"):
        model = model.double()
    elif half is not None and precision.endswith("-true"):
        model = model.to(half)
    elif half is not None:
        return model, lambda: torch.autocast(device.type, dtype=half)
    return model, contextlib.nullcontext


@torch.inference_mode()
def window_losses(
    model: torch.nn.Module,
    windows: np.ndarray,
    batch_size: int,
    autocast: Any = contextlib.nullcontext,
) -> np.ndarray:
    """Mean next-token cross-entropy of each window (logits in fp32, as training's loss), in
    fixed batches of ``batch_size`` windows: one float per window."""
    device = next(model.parameters()).device
    out = np.empty(len(windows), dtype=np.float64)
    for start in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[start : start + batch_size]).to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast():
            logits = model(input_ids=inputs).logits
        ce = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
        )
        out[start : start + len(batch)] = ce.view(len(batch), -1).mean(dim=1).double().cpu().numpy()
    return out


def prompts(windows: np.ndarray, n: int, prompt_tokens: int) -> list[np.ndarray]:
    """``n`` fixed prompts: the first ``prompt_tokens`` tokens of evenly spaced test windows."""
    if n <= 0 or not len(windows):
        return []
    picks = np.unique(
        np.linspace(0, len(windows) - 1, num=min(n, len(windows))).round().astype(int)
    )
    return [windows[i, : min(prompt_tokens, windows.shape[1])] for i in picks]


def _generation_config(n_tokens: int, temperature: float) -> GenerationConfig:
    """Exactly ``n_tokens`` new tokens, greedy or plain temperature sampling (no top-k/top-p),
    with no special tokens: our models have no EOS to stop at and no padding, and naming them
    None keeps Hugging Face from warning that it substitutes one."""
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    return GenerationConfig(
        max_new_tokens=n_tokens,
        use_cache=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **(sampling if temperature > 0 else dict(do_sample=False)),
    )


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompt: np.ndarray,
    n_tokens: int,
    context: int,
    temperature: float = 0.0,
    seed: int = 0,
    autocast: Any = contextlib.nullcontext,
) -> list[int]:
    """Continue ``prompt`` by ``n_tokens`` tokens with the model's own ``generate`` (a KV cache:
    one token's forward per new token, not the whole text's): greedy at temperature 0, else
    temperature sampling seeded by ``seed`` (a re-run gives the same text; the caller's random
    state is left untouched).

    No position exceeds ``context``, the window the model was trained on (GPT-2 has no position
    embedding past it). Where prompt + ``n_tokens`` fits, it is one call. Otherwise the prompt's
    front is cropped so that it does, but never below half the context of text to condition on:
    past that, the text is continued in chunks, each re-reading the last ``context // 2`` or more
    tokens (a fresh cache) and adding the rest of the context. The window thus slides by up to half
    a context at a time, where the earlier hand-written loop slid by one token and re-read the
    whole context for every token (the same tokens wherever prompt + ``n_tokens`` fits).
    """
    if n_tokens <= 0:
        return []
    seq = [int(t) for t in np.asarray(prompt).reshape(-1)]
    if not seq or context < 2:
        raise ValueError(f"generate needs a prompt and a context of 2 or more ({context})")
    device = next(model.parameters()).device
    new: list[int] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        while len(new) < n_tokens:
            left = n_tokens - len(new)
            keep = min(len(seq), max(context - left, context // 2))
            ids = torch.tensor([seq[len(seq) - keep :]], dtype=torch.long, device=device)
            config = _generation_config(min(left, context - keep), temperature)
            with autocast():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), generation_config=config
                )
            chunk = out[0, keep:].tolist()
            new += chunk
            seq += chunk
    return new


def load_model(path: Path, rec: dict[str, Any]) -> torch.nn.Module:
    """The Hugging Face model inside a saved CausalLMModule; UpstreamError if it does not load.
    Checkpoints written before ModuleSettings load too (CausalLMModule accepts their flat
    hyperparameters)."""
    try:
        module = CausalLMModule.load_from_checkpoint(str(path), map_location="cpu")
    except Exception as exc:  # torch/pickle raise many types for a damaged file
        raise UpstreamError(
            f"{rec.get('experiment')} run {run_name(rec)}: its saved model {path} does not load "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}); "
            f"re-train it with `python -m batchsize_study experiment={rec.get('experiment')} "
            f"seed={rec.get('seed')} force=true` (same study.dir)"
        ) from None
    return module.model


# ---------------------------------------------------------------- the run


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getbuffer())


def run_evaluate(c: Config) -> dict[str, Any]:
    """``experiment=evaluate``: score every paired saved model on the test split; write
    ``runs/evaluate-<hash>/`` (result.json, per_window_losses.npz) and nothing else."""

    t0 = time.time()
    s = c.evaluate
    sdir = study_dir(c)
    check_writable(sdir)
    corpus = prepare_corpus(c.data, c.model.seq_len)
    key = compat_key(c, corpus.fingerprint)
    deadline = time.monotonic() + c.upstream_wait_seconds
    while True:  # a parallel launcher may still be training the models
        try:
            pairs, notes = select_pairs(read_records(sdir), key, sdir)
            break
        except UpstreamError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    models = models_of(pairs)
    ckpts = {run_name(r): checkpoint_path(r) for r in models}  # every file checked before work
    precision = resolve_precision(c.precision, c.trainer.get("accelerator"))
    settings = asdict(s)
    chash = stable_hash(
        {
            "models": {
                n: [str(p), models[i].get("finished_at")] for i, (n, p) in enumerate(ckpts.items())
            },
            "evaluate": settings,
            "precision": precision,
            "seed": c.seed,
            "compat_key": key,
        }
    )
    run_id = f"{EXPERIMENT}-{chash}"
    run_dir = runs_dir(sdir) / run_id
    record_path = run_dir / RECORD
    if record_path.exists() and not c.force:
        old = [r for r in read_records(sdir, EXPERIMENT) if r["_path"] == str(record_path)]
        if old and old[0].get("status") == "completed":
            log.info(
                "evaluate %s already done: reporting its record; force=true re-runs it", run_id
            )
            return old[0]

    seq_len = c.model.seq_len
    windows = load_test_windows(corpus.test_path, corpus.dtype, seq_len, s.max_windows)
    if len(windows) < 2:
        raise DataError(
            f"data.test_fraction={c.data.test_fraction}: the test split gives {len(windows)} window(s) of "
            f"{seq_len + 1} tokens; raise data.test_fraction or use a larger corpus"
        )
    device = _device(c.trainer.get("accelerator"))
    tok = Tokenizer.from_file(corpus.tokenizer_path)
    prompt_ids = prompts(windows, s.samples, s.prompt_tokens)
    log.info(
        "evaluate: %d model(s) on %d test windows (%s tokens), %s on %s",
        len(models),
        len(windows),
        f"{len(windows) * seq_len:,}",
        precision,
        device,
    )
    losses: dict[str, np.ndarray] = {}
    model_rows: list[dict[str, Any]] = []
    for rec in models:
        name = run_name(rec)
        t1 = time.time()
        model, autocast = prepare_model(load_model(ckpts[name], rec), precision, device)
        losses[name] = window_losses(model, windows, s.batch_size, autocast)
        samples = [
            {
                "prompt": tok.decode([int(t) for t in p]),
                "continuation": tok.decode(
                    generate(model, p, s.sample_tokens, seq_len, s.temperature, c.seed, autocast)
                ),
            }
            for p in prompt_ids
        ]
        row = {
            "run_id": name,
            "experiment": rec["experiment"],
            "batch_size": rec["batch_size"],
            "seed": rec.get("seed"),
            "lr": rec.get("lr"),
            "steps_done": rec.get("steps_done"),
            "tokens_seen": rec.get("tokens_seen"),
            "final_val_loss": rec.get("final_val_loss"),
            "train_precision": rec.get("precision"),
            "checkpoint": str(ckpts[name]),
            **model_summary(losses[name], s.max_se),
            "samples": samples,
            "seconds": round(time.time() - t1, 2),
        }
        model_rows.append(row)
        log.info(
            "evaluate: %s test loss %.4f ± %.4f (ppl %.2f)",
            name,
            row["test_loss"],
            row["test_loss_se"],
            row["test_ppl"],
        )
        del model

    comparisons = []
    for b_large in sorted({int(p.large["batch_size"]) for p in pairs}):
        ps = sorted(
            (p for p in pairs if int(p.large["batch_size"]) == b_large), key=lambda p: p.seed
        )
        b_small = int(ps[0].small["batch_size"])
        d = difference(
            [losses[run_name(p.small)] for p in ps],
            [losses[run_name(p.large)] for p in ps],
            [p.seed for p in ps],
            s,
        )
        d.update(
            small_batch_size=b_small,
            large_batch_size=b_large,
            small_runs=[run_name(p.small) for p in ps],
            large_runs=[run_name(p.large) for p in ps],
            text=verdict_sentence(d, b_small, b_large, s.confidence),
        )
        comparisons.append(d)

    worst_se = max(r["test_loss_se"] for r in model_rows)
    too_small = not worst_se < s.max_se
    warning = None
    if too_small:
        need = int(math.ceil(len(windows) * (worst_se / s.max_se) ** 2))
        warning = (
            f"TEST SPLIT TOO SMALL: the standard error of a model's mean test loss is up to "
            f"{worst_se:.4f} nats, above the target evaluate.max_se={s.max_se} "
            f"({len(windows)} windows; about {need} would be needed). Raise data.test_fraction "
            f"(now {c.data.test_fraction}) or use a larger corpus"
            + (" (or raise evaluate.max_windows)" if s.max_windows is not None else "")
        )
        log.warning("evaluate: %s", warning)
    message = "; ".join(cmp["text"] for cmp in comparisons)
    if warning:
        message = f"{warning}. {message}"

    run_dir.mkdir(parents=True, exist_ok=True)
    npz_path = run_dir / LOSSES_FILE
    _write_npz(
        npz_path,
        {
            "run_ids": np.array(list(losses)),
            "losses": np.stack([losses[n] for n in losses]),
            "window_start_token": np.arange(len(windows)) * seq_len,
        },
    )
    record = json_safe(
        {
            "experiment": EXPERIMENT,
            "status": "completed",
            "message": message,
            "run_id": run_id,
            "study": c.study.name,
            "seed": c.seed,
            "batch_size": None,
            "seeds": sorted({p.seed for p in pairs}),
            "compat_key": key,
            "corpus_fingerprint": corpus.fingerprint,
            "corpus_token_hash": getattr(corpus, "token_hash", None),
            "test_split": {
                "windows": int(len(windows)),
                "tokens_scored": int(len(windows) * seq_len),
                "split_tokens": corpus.test_tokens,
                "split_documents": corpus.test_documents,
                "seq_len": seq_len,
                "max_windows": s.max_windows,
                "test_fraction": c.data.test_fraction,
            },
            "se_target": s.max_se,
            "max_test_loss_se": worst_se,
            "test_split_too_small": too_small,
            "warning": warning,
            "models": model_rows,
            "comparisons": comparisons,
            "not_evaluated": notes,
            "precision": precision,
            "device": str(device),
            "evaluate": settings,
            "per_window_losses": str(npz_path),
            "config_hash": chash,
            "wall_seconds": round(time.time() - t0, 2),
        }
    )
    record = write_record(record_path, record)
    for cmp in comparisons:
        log.info("evaluate: %s", cmp["text"])
    log.info("record: %s", record_path)
    from batchsize_study.wandb_results import log_evaluate

    log_evaluate(c, record, sdir)  # the test-set numbers as a wandb run, when wandb is on
    return record


# ---------------------------------------------------------------- report section
