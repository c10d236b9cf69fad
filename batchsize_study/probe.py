"""Is x real? ``experiment=stability_probe``: short constant-LR runs at multiples of the detected x.

The superconvergence run reads x off a *ramp*: the LR at the onset of a loss rise during a long
warmup. The probe asks the direct question instead: train at the small batch, same seed, at a
constant peak LR of ``m * x`` (after a brief warmup) for several multiples m, and see at which LR
training stops improving. Lightning's LR finder (``Tuner.lr_find``) runs on the same model and data
so its suggestion can be read beside x.

Definitions (what the summary record and :func:`analyse` compute):

* final loss L(m): the mean training loss over the last ``final_window`` steps of the run at
  ``m * x`` (+inf if any loss was non-finite), with its standard error se(m) (the std of those
  steps' losses / sqrt(final_window)).
* m *stops improving* when a higher LR no longer buys a lower loss in the same steps — L(m) is
  worse than the best L(m') at a lower multiple by more than ``noise_sigmas`` combined standard
  errors — or when the run itself destabilised (a non-finite loss, or the study's detector
  ``detector.*`` fired: smoothed loss ``threshold`` above its best for ``patience`` steps). The
  tolerance matters: at a small batch, neighbouring multiples differ by about the batch noise,
  and a plain L(m) >= L(m_prev) is then decided by that noise.
* the empirical boundary is where training stops improving *for good*: ``first_bad`` is the
  smallest multiple from which every higher multiple also stops improving (one noisy multiple
  followed by a good one does not end the range), ``last_good`` the multiple below it; the point
  estimate is their geometric mean. x *agrees* when it lies within a factor of 2 of that
  estimate. The first multiple that stops improving at all is recorded too
  (``first_bad_local``).
* reported beside it, not used for the boundary: the plain L(m) >= L(next-lower m) comparison,
  whether the run's smoothed loss still set a new best in its last ``trend_window`` steps, and the
  multiple with the lowest L (the best LR for this short horizon from initialisation).

The horizon matters: x is read where the ramp destabilised (``spike_step`` of superconvergence,
at a loss the short probes may never reach); probes shorter than that test stability earlier in
training, where it holds only at lower LRs (the reason warmup exists; Gilmer et al. 2021, "A Loss
Curvature Perspective on Training Instability").
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from batchsize_study.config import Config, ProbeConfig

log = logging.getLogger("batchsize_study")

SUMMARY = "stability_probe_summary"


# ---------------------------------------------------------------- the decision (pure)


def final_loss(losses: list[float], window: int) -> float:
    """Mean of the last ``window`` losses; +inf if any loss was non-finite (the run blew up)."""
    if not losses or any(not math.isfinite(v) for v in losses):
        return math.inf
    tail = losses[-window:]
    return sum(tail) / len(tail)


def final_loss_se(losses: list[float], window: int) -> float:
    """Standard error of :func:`final_loss` (std of the window's losses / sqrt(window))."""
    tail = losses[-window:]
    if len(tail) < 2 or any(not math.isfinite(v) for v in tail):
        return math.inf
    mean = sum(tail) / len(tail)
    var = sum((v - mean) ** 2 for v in tail) / (len(tail) - 1)
    return math.sqrt(var / len(tail))


def still_improving(losses: list[float], window: int) -> bool:
    """True when the smoothed loss sets a new best within the last ``window`` steps."""
    from batchsize_study.ladder import smooth

    if len(losses) <= window or any(not math.isfinite(v) for v in losses):
        return False
    sm = smooth(losses)
    return min(sm[-window:]) < min(sm[:-window])


def analyse(
    unstable_lr: float, probes: list[dict[str, Any]], noise_sigmas: float = 2.0
) -> dict[str, Any]:
    """Where training stops improving (see the module docstring for the definitions).

    ``probes``: dicts with ``multiple``, ``final_loss``, ``final_loss_se`` (0 if absent),
    ``destabilised`` and, reported only, ``improving``. Returns the per-probe
    verdicts, ``last_good``/``first_bad`` multiples, ``boundary_lr`` (None when every multiple
    improved: the boundary is above the probed range), ``x_over_boundary``,
    ``agrees_within_2x`` and, beside them, ``short_horizon_best_multiple``.
    """
    ordered = sorted(probes, key=lambda p: p["multiple"])
    verdicts, prev, best_lower = [], None, None
    first_bad = last_good = first_bad_local = None
    for p in ordered:
        finite = math.isfinite(p["final_loss"])
        se = p.get("final_loss_se") or 0.0
        margin = math.inf
        if best_lower is not None and finite:
            tol = noise_sigmas * math.sqrt(se**2 + (best_lower.get("final_loss_se") or 0.0) ** 2)
            margin = p["final_loss"] - best_lower["final_loss"] - tol
        worse_sig = best_lower is not None and finite and margin > 0
        stops = bool(not finite or p.get("destabilised") or worse_sig)
        reason = (
            "non-finite loss"
            if not finite
            else "destabilised during the run"
            if p.get("destabilised")
            else f"final loss worse than at {best_lower['multiple']:g}x beyond the noise"
            if worse_sig and best_lower is not None
            else ""
        )
        if finite and (best_lower is None or p["final_loss"] < best_lower["final_loss"]):
            best_lower = p
        worse = prev is not None and p["final_loss"] >= prev["final_loss"]
        verdicts.append(
            {**p, "stops_improving": stops, "reason": reason, "worse_than_lower": worse}
        )
        if stops and first_bad_local is None:
            first_bad_local = p["multiple"]
        prev = p
    for i, v in enumerate(verdicts):  # the smallest m from which every higher m stops improving
        if all(w["stops_improving"] for w in verdicts[i:]):
            first_bad = v["multiple"]
            last_good = verdicts[i - 1]["multiple"] if i > 0 else None
            break
    for v in verdicts:
        v["beyond_boundary"] = first_bad is not None and v["multiple"] >= first_bad
    finite = [p for p in ordered if math.isfinite(p["final_loss"])]
    best = min(finite, key=lambda p: p["final_loss"])["multiple"] if finite else None
    out: dict[str, Any] = {
        "probes": verdicts,
        "last_good_multiple": last_good,
        "first_bad_multiple": first_bad,
        "first_bad_local": first_bad_local,
        "unstable_lr": unstable_lr,
        "short_horizon_best_multiple": best,
        "short_horizon_best_lr": best * unstable_lr if best is not None else None,
    }
    if first_bad is None:
        out.update(
            boundary_lr=None,
            boundary="above the probed range",
            x_over_boundary=None,
            # above M x with M >= 2 is more than 2x above x; below that it is undetermined
            agrees_within_2x=False if ordered[-1]["multiple"] >= 2.0 else None,
        )
        return out
    if last_good is None:
        boundary_multiple = first_bad / 2.0  # below the probed range: at most half the lowest
        where = "below the probed range"
    else:
        boundary_multiple = math.sqrt(last_good * first_bad)
        where = f"between {last_good:g}x and {first_bad:g}x"
    boundary_lr = boundary_multiple * unstable_lr
    out.update(
        boundary_lr=boundary_lr,
        boundary_multiple=boundary_multiple,
        boundary=where,
        x_over_boundary=unstable_lr / boundary_lr,
        agrees_within_2x=0.5 <= unstable_lr / boundary_lr <= 2.0,
    )
    return out


def read_losses(metrics_csv: str | Path) -> list[float]:
    """The per-step training losses of a run (val rows skipped)."""
    out: list[float] = []
    p = Path(metrics_csv)
    if not p.exists():
        return out
    with p.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("train_loss"):
                out.append(float(row["train_loss"]))
    return out


# ---------------------------------------------------------------- running it


def probe_config(c: Config, s: ProbeConfig, lr: float) -> Config:
    """The training config of one probe: constant LR after ``s.warmup`` steps, ``s.steps`` long."""
    return replace(
        c,
        task="stability_probe",
        lr=lr,
        max_steps=s.steps,
        warmup_steps=s.warmup,
        val_every_steps=s.steps,
        schedule=replace(c.schedule, decay="constant"),
    )


def run_probe(c: Config) -> dict[str, Any]:
    """Run every probe (each writes its own record), Lightning's LR finder, and a summary record."""
    from batchsize_study.data import prepare_corpus
    from batchsize_study.runtime import compat_key, config_hash, study_dir
    from batchsize_study.study import (
        find_unstable_lr,
        make_run_id,
        runs_dir,
        write_json_atomic,
    )
    from batchsize_study.training import train

    t0 = time.time()
    s = c.probe
    sdir = study_dir(c)
    corpus = prepare_corpus(c.data, c.model.seq_len)
    key = compat_key(c, corpus.fingerprint)
    up = find_unstable_lr(sdir, c.seed, key, c.batch_size, c.upstream_wait_seconds)
    x = up.value
    log.info("stability probe: x = %.6g (%s); multiples %s", x, up.selection, s.multiples)
    probes = []
    for m in s.multiples:
        rec = train(
            probe_config(c, s, m * x),
            extra_record={"probe_multiple": m, "unstable_lr": x, "upstream": up.paths},
        )
        losses = read_losses(rec["metrics_csv"])
        probes.append(
            {
                "multiple": m,
                "lr": m * x,
                "final_loss": final_loss(losses, s.final_window),
                "final_loss_se": final_loss_se(losses, s.final_window),
                "improving": still_improving(losses, s.trend_window),
                "destabilised": rec.get("status") == "diverged" or "instability_warning" in rec,
                "status": rec.get("status"),
                "final_val_loss": rec.get("final_val_loss"),
                "run_id": rec.get("run_id"),
                "metrics_csv": rec.get("metrics_csv"),
            }
        )
    result = analyse(x, probes, s.noise_sigmas)
    finder = run_lr_find(c, s, corpus, x, sdir) if s.lr_find else None
    chash = config_hash(c, x)
    run_id = make_run_id("stability_probe-summary", c.batch_size, c.seed, chash)
    path = runs_dir(sdir) / run_id / "result.json"
    suggestion = finder.get("suggestion") if finder else None
    summary = {
        "experiment": SUMMARY,
        "status": "completed",
        "message": _message(result, suggestion),
        "run_id": run_id,
        "study": c.study.name,
        "seed": c.seed,
        "batch_size": c.batch_size,
        "compat_key": key,
        "corpus_fingerprint": corpus.fingerprint,
        "unstable_lr": x,
        "lr_source": f"{up.selection} from {', '.join(up.paths)}",
        "probe": asdict(s),
        "stops_improving_definition": (
            "m stops improving when its final loss (mean of the last final_window steps) is worse "
            "than the best final loss at a lower multiple by more than noise_sigmas combined "
            "standard errors, or its run destabilised (non-finite loss, or the detector fired); "
            "boundary = geometric mean of the last multiple before the first that stops improving "
            "and that one, times x"
        ),
        **_jsonable(result),
        "lr_find": finder,
        "lr_find_suggestion": suggestion,
        "lr_find_over_x": (suggestion / x) if suggestion else None,
        "config_hash": chash,
        "wall_seconds": round(time.time() - t0, 2),
        "finished_at": time.time(),
    }
    write_json_atomic(path, summary)
    summary["_path"] = str(path)
    log.info("stability probe: %s", summary["message"])
    log.info("record: %s", path)
    return summary


def _message(result: dict[str, Any], suggestion: float | None) -> str:
    x = result["unstable_lr"]
    if result["boundary_lr"] is None:
        msg = f"training still improved at the largest multiple; the boundary is above it (x = {x:.4g})"
    else:
        msg = (
            f"training stops improving {result['boundary']} "
            f"(boundary ~ {result['boundary_lr']:.4g}); x = {x:.4g} is "
            f"{'within' if result['agrees_within_2x'] else 'NOT within'} a factor of 2 of it"
        )
    best = result.get("short_horizon_best_lr")
    if best:
        msg += f"; the lowest final loss of these short runs is at {best:.4g} ({best / x:.3g} x)"
    if suggestion:
        msg += f"; Lightning lr_find suggests {suggestion:.4g} ({suggestion / x:.3g} x)"
    return msg


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """inf/nan are not JSON: store them as None (the probe's status says why)."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: fix(w) for k, w in v.items()}
        if isinstance(v, list):
            return [fix(w) for w in v]
        return v

    return fix(d)


def run_lr_find(
    c: Config, s: ProbeConfig, corpus: Any, x: float, sdir: str
) -> dict[str, Any] | None:
    """Lightning's ``Tuner.lr_find`` on the same model, data, batch and seed (exponential sweep,
    suggestion = steepest descent of the loss, Lightning's default); None if it fails."""
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    from batchsize_study.batch import plan_batch
    from batchsize_study.data import TokenDataModule
    from batchsize_study.model import CausalLMModule
    from batchsize_study.runtime import resolve_precision, resolve_world_size

    world = resolve_world_size(c.trainer)
    plan = plan_batch(c.batch_size, c.micro_batch_size, world, c.model.seq_len, c.max_steps)
    pl.seed_everything(c.seed, workers=True, verbose=False)
    module = CausalLMModule(
        c.model, c.optim, c.schedule, corpus.vocab_size, x, s.lr_find_num_training, 0
    )
    root = Path(sdir) / "runs" / f"stability_probe-lr_find-bs{c.batch_size}-seed{c.seed}"
    root.mkdir(parents=True, exist_ok=True)
    trainer_kwargs: dict[str, Any] = {
        "precision": resolve_precision(c.precision, c.trainer.get("accelerator")),
        "accumulate_grad_batches": plan.accumulate_grad_batches,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,
        "default_root_dir": str(root),
        "limit_val_batches": 0,
    }
    trainer_kwargs.update(c.trainer)
    trainer = pl.Trainer(**trainer_kwargs)
    n = s.lr_find_num_training
    dm = TokenDataModule(
        c.data,
        corpus,
        c.model.seq_len,
        c.micro_batch_size,
        c.seed,
        samples_per_rank=(n + 2) * plan.accumulate_grad_batches * c.micro_batch_size,
    )
    try:
        finder = Tuner(trainer).lr_find(
            module,
            datamodule=dm,
            min_lr=s.lr_find_min_lr,
            max_lr=s.lr_find_max_lr,
            num_training=n,
            update_attr=False,
        )
    except Exception as exc:  # an auxiliary reading: the probe's own answer stands without it
        log.warning("Lightning lr_find failed (%s); the probe continues without it", exc)
        return None
    if finder is None:
        return None
    suggestion = finder.suggestion()
    return {
        "suggestion": float(suggestion) if suggestion is not None else None,
        "method": "lightning.pytorch.tuner.Tuner.lr_find: exponential sweep, steepest descent",
        "min_lr": s.lr_find_min_lr,
        "max_lr": s.lr_find_max_lr,
        "num_training": n,
        "lrs": [float(v) for v in finder.results["lr"]],
        "losses": [float(v) if math.isfinite(v) else None for v in finder.results["loss"]],
    }


# ---------------------------------------------------------------- the report's section


def probe_section(
    study_dir: str | Path, out_dir: str | Path
) -> tuple[str, dict[str, Any], list[str]]:
    """(markdown, json-able data, PNG paths) of the study's latest stability probe."""
    from batchsize_study.study import read_records

    recs = read_records(study_dir, SUMMARY)
    lines = ["## Is x real? (stability probe)", ""]
    if not recs:
        lines.append(
            "No stability probe in this study: `python -m batchsize_study "
            "experiment=stability_probe` (after superconvergence) runs it."
        )
        return "\n".join(lines) + "\n", {}, []
    rec = recs[-1]
    data = {k: v for k, v in rec.items() if k != "_path"}
    x = rec["unstable_lr"]
    lines += [
        rec["message"] + ".",
        "",
        f"Constant-LR runs of {rec['probe']['steps']} steps ({rec['probe']['warmup']} warmup) at "
        f"batch {rec['batch_size']}, seed {rec['seed']}. *Stops improving*: "
        f"{rec['stops_improving_definition']}.",
        "",
        "| multiple of x | lr | final loss ± se | plain L >= L(lower) | status | stops improving "
        "| beyond boundary |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in rec["probes"]:
        fl, se = p["final_loss"], p.get("final_loss_se") or 0.0
        lines.append(
            f"| {p['multiple']:g} | {p['lr']:.4g} "
            f"| {'non-finite' if fl is None else f'{fl:.4f} ± {se:.3f}'} "
            f"| {'yes' if p.get('worse_than_lower') else 'no'} | {p['status']} "
            f"| {'yes: ' + p['reason'] if p['stops_improving'] else 'no'} "
            f"| {'yes' if p.get('beyond_boundary') else 'no'} |"
        )
    sug = rec.get("lr_find_suggestion")
    lines += [
        "",
        f"| reading | lr | / x |\n|---|---|---|\n| x (superconvergence onset) | {x:.4g} | 1 |",
    ]
    if rec.get("boundary_lr"):
        lines.append(
            f"| probe boundary ({rec['boundary']}) | {rec['boundary_lr']:.4g} | "
            f"{rec['boundary_lr'] / x:.3g} |"
        )
    best = rec.get("short_horizon_best_lr")
    if best:
        lines.append(
            f"| lowest final loss in {rec['probe']['steps']} steps (short-horizon optimum) | "
            f"{best:.4g} | {best / x:.3g} |"
        )
    if sug:
        lines.append(f"| Lightning `Tuner.lr_find` suggestion | {sug:.4g} | {sug / x:.3g} |")
    lines.append("")
    lines.append(
        "lr_find suggests the LR of the steepest loss descent in a short exponential sweep, "
        "typically well below the stability limit; x and the probe boundary measure the limit."
    )
    pngs = _plot_probe(rec, Path(out_dir))
    for p in pngs:
        lines.append(f"\n![{Path(p).stem}]({Path(p).name})")
    return "\n".join(lines) + "\n", data, pngs


def _plot_probe(rec: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    x = rec["unstable_lr"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for p in rec["probes"]:
        steps_losses = read_losses(p["metrics_csv"]) if p.get("metrics_csv") else []
        if steps_losses:
            ax1.plot(
                range(1, len(steps_losses) + 1),
                [v if math.isfinite(v) else float("nan") for v in steps_losses],
                lw=1,
                label=f"{p['multiple']:g} x",
            )
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss")
    ax1.set_title("Constant-LR probes")
    ax1.legend(fontsize=8)
    finite = [p for p in rec["probes"] if p["final_loss"] is not None]
    ax2.plot(
        [p["lr"] for p in finite],
        [p["final_loss"] for p in finite],
        "o-",
        color="k",
        label="probe final loss",
    )
    ax2.axvline(x, color="C3", ls="--", label=f"x = {x:.3g}")
    if rec.get("boundary_lr"):
        ax2.axvline(
            rec["boundary_lr"],
            color="C2",
            ls="-.",
            label=f"probe boundary {rec['boundary_lr']:.3g}",
        )
    finder = rec.get("lr_find") or {}
    if finder.get("suggestion"):
        ax2.axvline(
            finder["suggestion"], color="C0", ls=":", label=f"lr_find {finder['suggestion']:.3g}"
        )
    if finder.get("lrs"):
        ax3 = ax2.twinx()
        ax3.plot(
            finder["lrs"],
            [v if v is not None else float("nan") for v in finder["losses"]],
            color="C0",
            lw=0.8,
            alpha=0.6,
        )
        ax3.set_ylabel("lr_find loss", color="C0")
    ax2.set_xscale("log")
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel("final training loss")
    ax2.set_title("Where training stops improving")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = out / "stability_probe.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [str(path)]
