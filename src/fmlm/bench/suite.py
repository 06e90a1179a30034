"""``fmlm bench PRESET``: every method on the same data, backbone and token budget, side by side.

For each :class:`~fmlm.bench.presets.Variant` the bench trains a run (or reuses a
finished one from its cache, or one given with ``--use LABEL=RUN`` after checking
that its config matches), then, in one process with a fixed thread count, samples
each step count of the sweep and measures quality (valid rate and coverage on the
phrases task; on text, bits per byte and generative perplexity under a scorer LM, with
held-out text and its shuffled characters as reference rows), unigram entropy, wall time
per sample and samples per second. It writes ``results.json``, ``results.md``, three PNG
plots and ``samples.jsonl`` (every sample, for ``fmlm bench rescore``) into the output
folder; :mod:`fmlm.bench.report` renders them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from fmlm.bench.evaluate import environment, measure, warm_up
from fmlm.bench.metrics import (
    reference_entropy,
    reference_texts,
    score_references,
    score_texts,
    validation_metrics,
)
from fmlm.bench.presets import ABLATIONS, PRESETS, BenchPreset, Variant, get_preset, variants_for
from fmlm.bench.report import SAMPLES, add_references, markdown, write_outputs
from fmlm.bench.runs import Runs, variant_config
from fmlm.bench.settings import SettingCache
from fmlm.bench.words import corpus_vocabulary, word_validity
from fmlm.config import flatten
from fmlm.errors import ConfigError
from fmlm.runtime import default_cache_dir, pick_device


# ------------------------------------------------------------------ the bench
def parse_use(items: list[str] | None, labels: list[str]) -> dict[str, str]:
    out = {}
    lower = {l.lower(): l for l in labels}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--use expects LABEL=RUN, got {item!r}")
        k, v = item.split("=", 1)
        if k.strip().lower() not in lower:
            raise ConfigError(f"--use {k}: no such variant in this bench (have {', '.join(labels)})")
        out[lower[k.strip().lower()]] = v
    return out


def variant_steps(variant: Variant, steps: list[int]) -> list[int]:
    """A variant's own sweep, restricted to the bench's where they overlap (``--steps 1,2,4,8``)."""
    if not variant.steps:
        return list(steps)
    return [s for s in variant.steps if s in steps] or list(variant.steps)


def run_bench(
    preset_name: str,
    ablation: str | None = None,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    use: list[str] | None = None,
    steps: list[int] | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    scorer: str | None = None,
    scorer_batch: int | None = None,
    sample_batch: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    only: list[str] | None = None,
    train: bool = True,
    quiet: bool = False,
    plots: bool = True,
    command: str | None = None,
    distill_overrides: list[str] | None = None,
    resume: bool = True,
) -> dict:
    """Run a bench; returns the results dict (also written to ``out_dir``).

    Settings saved by an earlier (killed) bench with the same cache are reused unless
    ``resume`` is False (``--resample``); see :mod:`fmlm.bench.settings`.
    """
    from tqdm.auto import tqdm

    from fmlm.api import load
    from fmlm.bench.scorers import load_scorer
    from fmlm.train import load_data

    preset = get_preset(preset_name)
    overrides = list(overrides or [])
    distill_overrides = list(distill_overrides or [])
    for item in overrides + distill_overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"expected key=value, got {item!r}")
    variants = list(variants_for(ablation))
    if only:
        wanted = {o.lower() for o in only}
        unknown = wanted - {v.label.lower() for v in variants}
        if unknown:
            raise ConfigError(
                f"--only: unknown variant(s) {', '.join(sorted(unknown))} (have {', '.join(v.label for v in variants)})"
            )
        sampled = [v for v in variants if v.label.lower() in wanted]
    else:
        sampled = variants
    by_label = {v.label: v for v in variants}
    use_map = parse_use(use, list(by_label))
    steps = list(steps or preset.steps)
    num_samples = num_samples or preset.num_samples
    scorer_name = preset.scorer if scorer is None else scorer
    sample_batch = sample_batch or preset.sample_batch
    out = Path(out_dir) if out_dir else Path("runs") / "bench" / (preset.name + (f"-{ablation}" if ablation else ""))
    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "bench"
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    if threads:
        torch.set_num_threads(threads)
    # Check every config before spending time on any of them.
    for v in variants:
        variant_config(
            preset,
            v,
            overrides,
            None if v.self_distill or not v.distilled else "teacher",
            threads,
            device,
            distill_overrides,
        )

    runs = Runs(
        preset,
        overrides,
        cache,
        use_map,
        threads,
        device,
        log,
        progress=not quiet,
        train=train,
        distill_overrides=distill_overrides,
    )
    t_start = time.perf_counter()
    for i, v in enumerate(sampled, 1):
        log(f"[{i}/{len(sampled)}] {v.label}")
        runs.get(v, by_label)

    score = None
    if scorer_name and scorer_name != "none":
        log(f"loading scorer {scorer_name}")
        score = load_scorer(scorer_name, batch_size=scorer_batch, device=device)

    result = {
        "preset": preset.name,
        "description": preset.description,
        "ablation": ablation,
        "ablation_description": ABLATIONS[ablation][0] if ablation else None,
        "command": command,
        "overrides": overrides,
        "distill_overrides": distill_overrides,
        **environment(threads),
        "device": device or "auto",
        "seed": seed,
        "num_samples": num_samples,
        "steps": steps,
        "only": [v.label for v in sampled] if only else None,
        "sample_batch": sample_batch,
        "precision": "float32",
        "scorer": score.describe() if score is not None else None,
        "metric": "gen_bpb" if score is not None else None,
        "notes": list(preset.notes),
        "variants": {},
        "rows": [],
    }
    distilled = [v for v in variants if v.distilled and v.label in runs.done]
    if distilled:
        budgets = {}
        for v in distilled:
            t = variant_config(preset, v, overrides, "teacher", threads, device, distill_overrides).train
            budgets.setdefault(f"{t.max_steps:,} steps of batch {t.batch_size}", []).append(v.label)
        result["notes"].append(
            "Distillation budget of this run: "
            + "; ".join(f"{b} ({', '.join(labels)})" for b, labels in budgets.items())
            + "."
        )
    n_settings = sum(1 if v.method == "ar" else len(variant_steps(v, steps)) for v in sampled if v.sample)
    # Each finished setting is saved at once, so a killed bench resumes (settings.py).
    settings = SettingCache(cache, result["threads"], str(pick_device(device)), enabled=resume, log=log)
    bar = tqdm(total=n_settings, desc="sample", unit="setting", disable=quiet, dynamic_ncols=True)
    data_entropy = vocab = None
    samples: list[dict] = []  # every decoded sample of every setting (samples.jsonl)
    swept = {v.label for v in sampled if v.sample}
    for v in variants:  # every trained run (teachers too) gets its validation metrics
        if v.label not in runs.done:
            continue
        rec = runs.done[v.label]
        model = load(rec["checkpoint"], device=device)
        if data_entropy is None:
            data = load_data(model.config, tokenizer=model.tokenizer)
            data_entropy = reference_entropy(data.val)
            result["data_entropy"] = data_entropy
            # The reference rows (held-out text and its shuffled characters) are saved even
            # unscored, so that `fmlm bench rescore` can score them later.
            refs = reference_texts(data.val, model.tokenizer, num_samples, seed)
            if model.task is None:  # real text: the share of letters in words of the training text
                vocab = corpus_vocabulary(data.train, model.tokenizer)
                for name, (texts, _) in refs.items():
                    result[f"{name}_word_valid"] = word_validity(texts, vocab)
            if score is not None:
                log("scoring held-out text and its shuffled characters (the reference rows)")
                add_references(result, score_references(refs, score))
            for name, (texts, ended) in refs.items():
                samples += [
                    {"label": name, "steps": None, "index": i, "text": t, "ended": e}
                    for i, (t, e) in enumerate(zip(texts, ended))
                ]
            if model.task is not None and result["metric"] is None:
                result["metric"] = "valid_rate"
        rec = dict(rec)
        rec.update(validation_metrics(model.method, data.val, batch_size=model.config.train.batch_size))
        rec["parameters"] = sum(p.numel() for p in model.method.parameters())
        result["variants"][v.label] = rec
        if v.label not in swept:
            continue
        vsteps = variant_steps(v, steps)
        if v.method == "ar":
            vsteps = [model.config.data.seq_len]  # AR: one pass per position, sequentially
        warmed = False
        for s in vsteps:
            bar.set_postfix_str(f"{v.label} {s} steps")
            saved = settings.load(runs.done[v.label], s, num_samples, seed, sample_batch, score)
            if saved is None:
                if not warmed:
                    warm_up(model, sample_batch)
                    warmed = True
                mine: list[dict] = []
                row = measure(model, s, num_samples, seed, sample_batch, None, keep_texts=3, samples=mine)
                scores = None
                if score is not None:
                    scores = score_texts([x["text"] for x in mine], [x["ended"] for x in mine], score)
                settings.save(runs.done[v.label], s, num_samples, seed, sample_batch, row, mine, score, scores)
                row.update(scores or {})
            else:
                row, mine = saved
            if vocab is not None:
                row["word_valid"] = word_validity([x["text"] for x in mine], vocab)
            row = {"label": v.label, "method": v.method, **row}
            samples += [{"label": v.label, "steps": s, **x} for x in mine]
            result["rows"].append(row)
            bar.update(1)
        del model
    bar.close()
    result["bench_seconds"] = time.perf_counter() - t_start
    result["settings_reused"] = settings.reused
    write_outputs(result, out, plots=plots, samples=samples)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / SAMPLES}" + (" and plots" if plots else ""))
    return result


# ------------------------------------------------------------------ CLI
def describe(
    preset: BenchPreset, ablation: str | None, overrides: list[str], distill_overrides: list[str] | None = None
) -> str:
    """The plan of a bench: every run's full config (``--dry-run``)."""
    variants = variants_for(ablation)
    lines = [f"bench {preset.name}: {preset.description}"]
    lines += [f"  {n}" for n in preset.notes]
    lines.append(f"steps {','.join(map(str, preset.steps))}; {preset.num_samples} samples; scorer {preset.scorer}")
    for v in variants:
        teacher = None if v.self_distill or not v.distilled else f"<checkpoint of {v.teacher}>"
        cfg = variant_config(preset, v, overrides, teacher, distill_overrides=distill_overrides)
        flat = {k: val for k, val in flatten(cfg.to_dict()).items() if k not in ("preset",)}
        lines.append(f"--- {v.label} ({v.method})" + (f", distils {v.teacher}" if teacher else ""))
        lines.append(json.dumps(flat))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fmlm.argtypes import positive, steps_list

    p.add_argument("preset", metavar="PRESET", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")
    p.add_argument("--ablation", choices=list(ABLATIONS), help="run an ablation instead of the method comparison")
    p.add_argument("--steps", type=steps_list, help="comma-separated step counts (default: 1,2,4,...,256,1024)")
    p.add_argument("--num-samples", "-n", type=positive, help="samples per setting (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", help="gen-PPL scorer (gemma-3-270m, smollm2-135m, ar:RUN, HF name/dir, none)")
    p.add_argument("--scorer-batch", type=positive, help="texts per scorer forward pass")
    p.add_argument("--sample-batch", type=positive, help="samples per sampling call")
    p.add_argument("--out", help="output folder (default: runs/bench/PRESET[-ABLATION])")
    p.add_argument("--cache-dir", help="where trained runs are cached (default: $FMLM_CACHE/bench)")
    p.add_argument(
        "--use",
        action="append",
        metavar="LABEL=RUN",
        help="reuse a finished run for a variant (its config must match the bench's)",
    )
    p.add_argument(
        "--distill-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for the distilled runs only (flow maps, Duo+DCD, MDLM+SDTT), e.g. max_steps=1000",
    )
    p.add_argument("--only", help="comma-separated variant labels to sample (their teachers are still trained)")
    p.add_argument("--no-train", action="store_true", help="fail instead of training a missing run")
    p.add_argument(
        "--resample",
        action="store_true",
        help="sample every setting again instead of reusing the ones an earlier bench saved in the cache",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=positive, help="CPU threads for training and sampling (fixed for timing)")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--dry-run", action="store_true", help="print every run's config and exit")
    p.add_argument("--force", action="store_true", help="run a GPU recipe (lm1b, owt) without a GPU")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    preset = get_preset(args.preset)
    for item in args.overrides + args.distill_set:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
    if args.dry_run:
        print(describe(preset, args.ablation, args.overrides, args.distill_set))
        return 0
    if preset.gpu_recipe and not args.force and not torch.cuda.is_available():
        raise ConfigError(
            f"bench {preset.name} is a GPU recipe ({preset.description}); see it with --dry-run, or pass --force"
        )
    command = "fmlm bench " + " ".join(shlex.quote(a) for a in argv)
    result = run_bench(
        args.preset,
        args.ablation,
        args.overrides,
        args.out,
        args.cache_dir,
        args.use,
        args.steps,
        args.num_samples,
        args.seed,
        args.scorer,
        args.scorer_batch,
        args.sample_batch,
        args.threads,
        args.device,
        args.only.split(",") if args.only else None,
        train=not args.no_train,
        quiet=args.quiet,
        plots=not args.no_plots,
        command=command,
        distill_overrides=args.distill_set,
        resume=not args.resample,
    )
    print(markdown(result))
    return 0
