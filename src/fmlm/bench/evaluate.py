"""``fmlm eval --ckpt RUN``: sample quality, diversity, speed and likelihood of one checkpoint."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fmlm.bench.metrics import (
    decode_samples,
    git_commit,
    mean_entropy,
    reference_entropy,
    reference_texts,
    score_references,
    score_texts,
    validation_metrics,
)
from fmlm.errors import ConfigError
from fmlm.io import write_text


def measure(
    model,
    steps: int,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 256,
    scorer=None,
    float64: bool = False,
    keep_texts: int = 0,
    samples: list | None = None,
    **options,
) -> dict:
    """Sample ``num_samples`` with ``steps`` steps; time it; score it.

    Returns a row with ``steps``, ``nfe`` (network passes per sample: L for AR),
    ``seconds_per_sample``, ``samples_per_s``, ``entropy``, and ``valid_rate`` /
    ``coverage`` on the phrases task or ``gen_ppl``, ``gen_bpb`` (and friends) under
    ``scorer``. When ``samples`` is a list, every decoded sample (cut before its first
    EOS) is appended to it as ``{"index", "text", "ended"}``, so that the setting can be
    re-scored later without sampling again.
    """
    method = model.config.train.method
    t0 = time.perf_counter()
    ids = model.sample_ids(num_samples, steps, seed, float64=float64, batch_size=batch_size, **options)
    dt = time.perf_counter() - t0
    L = ids.shape[1]
    row = {
        "steps": steps,
        "nfe": L if method == "ar" else steps,
        "num_samples": num_samples,
        "seconds": dt,
        "seconds_per_sample": dt / num_samples,
        "samples_per_s": num_samples / max(dt, 1e-12),
        "entropy": mean_entropy(ids),
    }
    if model.task is not None:
        m = model.task.check(ids)
        row.update(valid_rate=m["valid_rate"], block_valid_rate=m["block_valid_rate"], coverage=m["coverage"])
    if scorer is not None or samples is not None:
        texts, ended = decode_samples(ids, model.tokenizer)
        if scorer is not None:
            row.update(score_texts(texts, ended, scorer))
        if samples is not None:
            samples.extend({"index": i, "text": t, "ended": e} for i, (t, e) in enumerate(zip(texts, ended)))
    if keep_texts:
        row["texts"] = model.decode(ids[:keep_texts])
    return row


def warm_up(model, batch_size: int, **options) -> None:
    """One small untimed sampling call (allocations, lazy init) before timing anything."""
    model.sample_ids(min(batch_size, 8), 2, seed=0, **options)


def environment(threads: int | None) -> dict:
    return {
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads or torch.get_num_threads(),
        "machine": platform.machine(),
    }


def evaluate(
    path: str,
    steps_list: list[int] | None = None,
    num_samples: int = 256,
    seed: int = 0,
    scorer_name: str | None = "auto",
    scorer_batch: int | None = None,
    val_batches: int = 8,
    batch_size: int = 256,
    float64: bool = False,
    device: str | None = None,
    threads: int | None = None,
    keep_texts: int = 2,
    log=None,
    **options,
) -> dict:
    """Evaluate one checkpoint (see :func:`measure`); the dict ``fmlm eval`` writes as JSON.

    ``scorer_name`` ``"auto"`` means the default scorer for real text and none for the
    phrases task (which reports valid rate and coverage instead); ``None`` or ``"none"``
    skips generative perplexity.
    """
    from fmlm.api import load
    from fmlm.bench.scorers import DEFAULT_SCORER, load_scorer
    from fmlm.train import load_data

    log = log or (lambda msg: None)
    if threads:
        torch.set_num_threads(threads)
    model = load(path, device=device)
    cfg = model.config
    steps_list = steps_list or [cfg.sample.steps]
    if cfg.train.method == "ar":
        steps_list = [cfg.data.seq_len]  # AR ignores the step count: L sequential passes, one row
    if scorer_name == "auto":
        scorer_name = None if model.task is not None else DEFAULT_SCORER
    if scorer_name == "none":
        scorer_name = None
    scorer = None
    if scorer_name is not None:
        log(f"loading scorer {scorer_name}")
        scorer = load_scorer(scorer_name, batch_size=scorer_batch, device=device)
    data = load_data(cfg, tokenizer=model.tokenizer)
    result = {
        "checkpoint": str(model.path),
        "method": cfg.train.method,
        "preset": cfg.preset,
        **environment(threads),
        "seed": seed,
        "num_samples": num_samples,
        "precision": "float64" if float64 else "float32",
        "device": str(model.device),
        "scorer": scorer.describe() if scorer is not None else None,
        "data_entropy": reference_entropy(data.val),
        "options": {k: v for k, v in options.items() if v is not None},
    }
    if scorer is not None:
        log("scoring held-out text and its shuffled characters (the reference rows)")
        result["references"] = score_references(reference_texts(data.val, model.tokenizer, num_samples, seed), scorer)
        result["data_bpb"] = result["references"].get("data", {}).get("gen_bpb")
        result["shuffled_bpb"] = result["references"].get("shuffled", {}).get("gen_bpb")
        log(
            f"data {_fmt_bpb(result['data_bpb'])} bits/byte, shuffled characters "
            f"{_fmt_bpb(result['shuffled_bpb'])} bits/byte"
        )
    if val_batches > 0:
        log("validation metrics")
        result.update(validation_metrics(model.method, data.val, batch_size=cfg.train.batch_size, batches=val_batches))
    warm_up(model, batch_size, float64=float64, **options)
    rows = []
    for steps in steps_list:
        row = measure(model, steps, num_samples, seed, batch_size, scorer, float64, keep_texts, **options)
        line = f"steps {steps:>5}: {row['seconds_per_sample'] * 1e3:.2f} ms/sample, entropy {row['entropy']:.3f}"
        if "valid_rate" in row:
            line += f", valid {row['valid_rate']:.3f}, coverage {row['coverage']:.3f}"
        if "gen_ppl" in row:
            line += f", gen-PPL {row['gen_ppl']:.2f}, {_fmt_bpb(row['gen_bpb'])} bits/byte"
        log(line)
        rows.append(row)
    result["results"] = rows
    return result


def _fmt_bpb(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def run(args: argparse.Namespace) -> int:
    """The ``fmlm eval`` command."""
    if args.num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    options = {"gamma": args.gamma}
    result = evaluate(
        args.ckpt,
        args.steps,
        args.num_samples,
        args.seed,
        args.scorer,
        args.scorer_batch,
        args.val_batches,
        args.batch_size,
        args.float64,
        args.device,
        args.threads,
        log=log,
        **options,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, text + "\n")  # atomic: a killed run never leaves half a JSON file
        log(f"wrote {out}")
    print(text)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``fmlm eval`` (kept here so cli.py stays a thin dispatcher)."""
    from fmlm.argtypes import positive, steps_list

    p.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    p.add_argument("--steps", type=steps_list, help="comma-separated step counts (default: the run's)")
    p.add_argument("--num-samples", "-n", type=positive, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scorer",
        default="auto",
        help="gen-PPL scorer: gemma-3-270m (default for text), smollm2-135m, ar:RUN, a Hugging Face "
        "name or local directory, or none (default for the phrases task: valid rate instead)",
    )
    p.add_argument("--scorer-batch", type=positive, help="texts per scorer forward pass (default 4 for gemma)")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches for the likelihood (0: skip)")
    p.add_argument("--batch-size", type=positive, default=256, help="samples per sampling call")
    p.add_argument("--gamma", type=float, help="flow-map models: stochastic re-noising in [0, 1)")
    p.add_argument("--float64", action="store_true", help="integrate the flow in float64")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--threads", type=positive, help="CPU threads")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr")
