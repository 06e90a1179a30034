"""``fmlm bench PRESET``: every method on the same data, backbone and token budget, side by side.

For each :class:`~fmlm.bench.presets.Variant` the bench trains a run (or reuses a
finished one from its cache, or one given with ``--use LABEL=RUN`` after checking
that its config matches), then, in one process with a fixed thread count, samples
each step count of the sweep and measures quality (valid rate and coverage on the
phrases task, generative perplexity under a scorer LM on text), unigram entropy,
wall time per sample and samples per second. It writes ``results.json``,
``results.md`` and three PNG plots into the output folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from fmlm import checkpoint as ckpt
from fmlm.bench.evaluate import environment, measure, warm_up
from fmlm.bench.metrics import reference_entropy, validation_metrics
from fmlm.bench.presets import ABLATIONS, PRESETS, BenchPreset, Variant, get_preset, variants_for
from fmlm.config import RunConfig, build_config, set_value, validate
from fmlm.errors import ConfigError, FmlmError
from fmlm.io import write_json
from fmlm.train import RESUMABLE_KEYS, Trainer, _flatten, default_cache_dir

# Keys that do not change what a run learns (bookkeeping, placement, paths).
_IGNORED = set(RESUMABLE_KEYS) | {"preset", "model.vocab_size", "model.max_seq_len", "distill.teacher",
                                  "train.threads", "train.device", "data.cache_dir"}
_BUDGET = ("train.max_steps", "train.max_minutes")


# ------------------------------------------------------------------ configs
def variant_config(preset: BenchPreset, variant: Variant, overrides: list[str], teacher: str | None = None,
                   threads: int | None = None, device: str | None = None,
                   distill_overrides: list[str] | None = None) -> RunConfig:
    """The run config of one variant: the preset's shared overrides, then the variant's.

    Flow maps follow ``fmlm distill``: AdamW β2 = 0.95, a two-time backbone, one-step
    samples, then the preset's distillation overrides, the variant's and the user's
    (``overrides`` for every run, then ``distill_overrides`` for flow maps only).
    """
    shared = list(preset.overrides)
    if not variant.distilled:
        cfg = build_config(preset.config, shared + list(variant.overrides) + list(overrides))
        cfg.train.method = variant.method
    else:
        cfg = build_config(preset.config, shared)
        cfg.train.method = variant.method
        cfg.train.beta2 = 0.95
        cfg.sample.steps = 1
        for item in list(preset.distill) + list(variant.overrides) + list(overrides) + list(distill_overrides or []):
            k, v = item.split("=", 1)
            set_value(cfg, k.strip(), v)
        cfg.model.two_time = True
        if variant.self_distill:
            cfg.distill.self_distill = True
            cfg.distill.teacher = ""
        else:
            if teacher is None:
                raise ConfigError(f"variant {variant.label} needs its teacher's checkpoint")
            cfg.distill.teacher = str(teacher)
    if threads:
        cfg.train.threads = threads
    if device:
        cfg.train.device = device
    validate(cfg)
    cfg.preset = f"bench-{preset.name}-{variant.label}"
    return cfg


def comparable(cfg: dict) -> dict:
    """The flattened config without the keys that do not change what is learned (budget kept)."""
    flat = _flatten(cfg)
    return {k: v for k, v in flat.items() if k not in _IGNORED or k in _BUDGET}


def config_key(cfg: RunConfig, teacher_key: str | None = None) -> str:
    """Cache key: a hash of the comparable config (and of the teacher's key for a flow map)."""
    payload = json.dumps({"config": comparable(cfg.to_dict()), "teacher": teacher_key}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def config_difference(saved: dict, wanted: dict) -> str | None:
    """The first key where two configs differ in a way that matters, as ``key: a -> b``.

    A key the saved config lacks (written before that key existed) counts as its default.
    """
    defaults = comparable(RunConfig().to_dict())
    a, b = {**defaults, **comparable(saved)}, {**defaults, **comparable(wanted)}
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
    return None


def finished(run_dir: Path, cfg: RunConfig) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run_dir`` if it has used its whole budget, with its trainer state."""
    latest = ckpt.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is None:
        return None
    state = ckpt.read_json(latest / "trainer_state.json")
    t = cfg.train
    if state.get("step", 0) >= t.max_steps or (t.max_minutes > 0 and state.get("elapsed", 0.0) >= t.max_minutes * 60):
        return latest, state
    return None


# ------------------------------------------------------------------ training
class Runs:
    """Finds, checks or trains the run of each variant."""

    def __init__(self, preset: BenchPreset, overrides: list[str], cache_dir: Path, use: dict[str, str],
                 threads: int | None, device: str | None, log, progress: bool, train: bool = True,
                 distill_overrides: list[str] | None = None):
        self.preset, self.overrides, self.cache_dir = preset, overrides, cache_dir
        self.distill_overrides = list(distill_overrides or [])
        self.use, self.threads, self.device = use, threads, device
        self.log, self.progress, self.train = log, progress, train
        self.done: dict[str, dict] = {}  # label -> record (run_dir, checkpoint, key, status, ...)

    def get(self, variant: Variant, by_label: dict[str, Variant]) -> dict:
        if variant.label in self.done:
            return self.done[variant.label]
        teacher_ckpt = teacher_key = None
        if variant.distilled and not variant.self_distill:
            if variant.teacher not in by_label:
                raise ConfigError(f"variant {variant.label}: teacher {variant.teacher!r} is not in this bench")
            rec = self.get(by_label[variant.teacher], by_label)
            teacher_ckpt, teacher_key = rec["checkpoint"], rec["key"]
        cfg = variant_config(self.preset, variant, self.overrides, teacher_ckpt, self.threads, self.device,
                             self.distill_overrides)
        key = config_key(cfg, teacher_key)
        if variant.label in self.use:
            rec = self._reuse(variant, cfg, Path(self.use[variant.label]))
        else:
            run_dir = self.cache_dir / f"{variant.label}-{variant.method}-{key}"
            rec = self._cached_or_train(variant, cfg, run_dir)
        rec.update(label=variant.label, method=variant.method, key=key)
        self.done[variant.label] = rec
        return rec

    def _reuse(self, variant: Variant, cfg: RunConfig, run_dir: Path) -> dict:
        latest = ckpt.latest_checkpoint(run_dir) if run_dir.is_dir() else None
        if latest is None and (run_dir / "config.json").is_file() and (run_dir / "manifest.json").is_file():
            latest = run_dir  # a checkpoint directory itself
        if latest is None:
            raise ConfigError(f"--use {variant.label}={run_dir}: no checkpoint there")
        saved = ckpt.read_json(latest / "config.json")
        wanted = cfg.to_dict()
        diff = config_difference(saved, wanted)
        if diff is None and variant.distilled and not variant.self_distill:
            # The teacher must be the bench's FLM: compare the teacher checkpoints' configs.
            t_saved = Path(saved["distill"].get("teacher", ""))
            if t_saved.is_dir() and (t_saved / "config.json").is_file():
                diff = config_difference(ckpt.read_json(t_saved / "config.json"),
                                         ckpt.read_json(Path(cfg.distill.teacher) / "config.json"))
                diff = f"its teacher's {diff}" if diff else None
        if diff is not None:
            raise ConfigError(f"--use {variant.label}={run_dir}: its config differs from the bench's ({diff})")
        state = ckpt.read_json(latest / "trainer_state.json")
        if state.get("step", 0) < cfg.train.max_steps:
            raise ConfigError(f"--use {variant.label}={run_dir}: trained {state.get('step', 0)} of "
                              f"{cfg.train.max_steps} steps")
        self.log(f"{variant.label}: reusing {latest} (config matches the bench)")
        return {"run_dir": str(run_dir), "checkpoint": str(latest), "status": "reused", "step": state.get("step"),
                "train_seconds": state.get("elapsed"), "tokens": state.get("tokens")}

    def _cached_or_train(self, variant: Variant, cfg: RunConfig, run_dir: Path) -> dict:
        done = finished(run_dir, cfg)
        status = "cached"
        if done is None:
            if not self.train:
                raise FmlmError(f"{variant.label} is not trained yet ({run_dir}); run without --no-train")
            status = "trained"
            self.log(f"{variant.label}: training {cfg.train.method} into {run_dir}")
            tokenizer = None
            if cfg.distill.teacher:
                from fmlm.data import load_tokenizer

                tokenizer = load_tokenizer(Path(cfg.distill.teacher) / "tokenizer")
            trainer = Trainer(cfg, run_dir, resume=True, progress=self.progress, log=self.log, tokenizer=tokenizer)
            summary = trainer.fit()
            if summary["interrupted"]:
                raise KeyboardInterrupt
            done = finished(run_dir, cfg)
            if done is None:  # pragma: no cover - fit() always reaches the budget unless interrupted
                raise FmlmError(f"{variant.label}: training stopped before its budget ({run_dir})")
        else:
            self.log(f"{variant.label}: cached run {done[0]}")
        latest, state = done
        return {"run_dir": str(run_dir), "checkpoint": str(latest), "status": status, "step": state.get("step"),
                "train_seconds": state.get("elapsed"), "tokens": state.get("tokens")}


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


def run_bench(preset_name: str, ablation: str | None = None, overrides: list[str] | None = None,
              out_dir: str | Path | None = None, cache_dir: str | Path | None = None, use: list[str] | None = None,
              steps: list[int] | None = None, num_samples: int | None = None, seed: int = 0,
              scorer: str | None = None, scorer_batch: int | None = None, sample_batch: int | None = None,
              threads: int | None = None, device: str | None = None, only: list[str] | None = None,
              train: bool = True, quiet: bool = False, plots: bool = True, command: str | None = None,
              distill_overrides: list[str] | None = None) -> dict:
    """Run a bench; returns the results dict (also written to ``out_dir``)."""
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
            raise ConfigError(f"--only: unknown variant(s) {', '.join(sorted(unknown))} "
                              f"(have {', '.join(v.label for v in variants)})")
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
        variant_config(preset, v, overrides, None if v.self_distill or not v.distilled else "teacher",
                       threads, device, distill_overrides)

    runs = Runs(preset, overrides, cache, use_map, threads, device, log, progress=not quiet, train=train,
                distill_overrides=distill_overrides)
    t_start = time.perf_counter()
    for i, v in enumerate(sampled, 1):
        log(f"[{i}/{len(sampled)}] {v.label}")
        runs.get(v, by_label)

    score = None
    if scorer_name and scorer_name != "none":
        log(f"loading scorer {scorer_name}")
        score = load_scorer(scorer_name, batch_size=scorer_batch, device=device)

    result = {
        "preset": preset.name, "description": preset.description, "ablation": ablation,
        "ablation_description": ABLATIONS[ablation][0] if ablation else None,
        "command": command, "overrides": overrides, "distill_overrides": distill_overrides, **environment(threads), "device": device or "auto",
        "seed": seed, "num_samples": num_samples, "steps": steps, "sample_batch": sample_batch,
        "precision": "float32", "scorer": score.describe() if score is not None else None,
        "metric": "gen_ppl" if score is not None else None, "notes": list(preset.notes),
        "variants": {}, "rows": [],
    }
    settings = sum(1 if v.method == "ar" else len(v.steps or steps) for v in sampled if v.sample)
    bar = tqdm(total=settings, desc="sample", unit="setting", disable=quiet, dynamic_ncols=True)
    data_entropy = None
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
            if model.task is not None and result["metric"] is None:
                result["metric"] = "valid_rate"
        rec = dict(rec)
        rec.update(validation_metrics(model.method, data.val, batch_size=model.config.train.batch_size))
        rec["parameters"] = sum(p.numel() for p in model.method.parameters())
        result["variants"][v.label] = rec
        if v.label not in swept:
            continue
        warm_up(model, sample_batch)
        vsteps = v.steps or steps
        if v.method == "ar":
            vsteps = [model.config.data.seq_len]  # AR: one pass per position, sequentially
        for s in vsteps:
            bar.set_postfix_str(f"{v.label} {s} steps")
            row = measure(model, s, num_samples, seed, sample_batch, score, keep_texts=3)
            row = {"label": v.label, "method": v.method, **row}
            result["rows"].append(row)
            bar.update(1)
        del model
    bar.close()
    result["bench_seconds"] = time.perf_counter() - t_start
    write_outputs(result, out, plots=plots)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (" and plots" if plots else ""))
    return result


# ------------------------------------------------------------------ outputs
def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def _rate(x) -> str:
    """Samples per second with three significant figures, never in exponent form."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, ".0f") if x >= 100 else format(x, ".3g")


#: A setting whose unigram entropy is off the data's by more than this fraction has collapsed.
ENTROPY_TOLERANCE = 0.1


def _collapsed(row: dict, data_entropy, tolerance: float = ENTROPY_TOLERANCE) -> bool:
    """Whether a setting's unigram entropy is off the data's by more than ``tolerance`` of it."""
    if data_entropy is None or row.get("entropy") is None:
        return False
    return abs(row["entropy"] - data_entropy) > tolerance * data_entropy


def headline(result: dict, reference: str = "FMLM", steps: int = 1,
             entropy_tolerance: float = ENTROPY_TOLERANCE) -> dict | None:
    """The seed's speed claim, read off the rows: ``reference`` at ``steps`` against the rest.

    For every other model, the cheapest setting (least wall time per sample) whose
    quality is at least the reference's (gen-PPL at or below it; valid rate at or above
    it on the phrases task), and its time as a multiple of the reference's. When the data's
    entropy is known, a setting whose unigram entropy is off by more than
    ``entropy_tolerance`` of it (a collapsed sampler: all spaces scores a low gen-PPL) is not
    a match, and not a model's "best" either. A model with no match in the sweep gets
    ``match: None`` and its best setting instead.
    Returns ``None`` when the rows hold no such reference setting or no quality metric.
    """
    rows = result.get("rows", [])
    metric = "gen_ppl" if any("gen_ppl" in r for r in rows) else "valid_rate"
    ref = next((r for r in rows if r["label"] == reference and r["steps"] == steps and r.get(metric) is not None),
               None)
    if ref is None:
        return None
    lower = metric == "gen_ppl"

    data_h = result.get("data_entropy")

    def healthy(r) -> bool:
        return not _collapsed(r, data_h, entropy_tolerance)

    def at_least_as_good(r) -> bool:
        q = r.get(metric)
        return q is not None and healthy(r) and (q <= ref[metric] if lower else q >= ref[metric])

    def brief(r) -> dict:
        return {"steps": r["steps"], "nfe": r["nfe"], metric: r[metric], "entropy": r.get("entropy"),
                "seconds_per_sample": r["seconds_per_sample"],
                "time_ratio": r["seconds_per_sample"] / ref["seconds_per_sample"]}

    out = {"reference": reference, "steps": steps, "metric": metric, metric: ref[metric],
           "entropy": ref.get("entropy"), "data_entropy": data_h, "entropy_tolerance": entropy_tolerance,
           "entropy_ok": healthy(ref), "seconds_per_sample": ref["seconds_per_sample"], "others": {}}
    for label in dict.fromkeys(r["label"] for r in rows):
        if label == reference:
            continue
        mine = [r for r in rows if r["label"] == label and r.get(metric) is not None]
        sane = [r for r in mine if healthy(r)]
        if not sane:
            out["others"][label] = {"match": None, "best": None}
            continue
        good = [r for r in sane if at_least_as_good(r)]
        best = min(sane, key=lambda r: r[metric] if lower else -r[metric])
        out["others"][label] = {"match": brief(min(good, key=lambda r: r["seconds_per_sample"])) if good else None,
                                "best": brief(best)}
    return out


def _headline_md(h: dict) -> list[str]:
    name = "gen-PPL" if h["metric"] == "gen_ppl" else "valid rate"
    spec = ".1f" if h["metric"] == "gen_ppl" else ".3f"

    def at(n: int) -> str:
        return f"{n} step" + ("" if n == 1 else "s")

    ent = ""
    if h.get("entropy") is not None:
        ent = f", entropy {_fmt(h['entropy'], '.3f')}"
        if h.get("data_entropy") is not None:
            ent += (f" ({'within' if h.get('entropy_ok', True) else 'NOT within'} "
                    f"{h.get('entropy_tolerance', ENTROPY_TOLERANCE):.0%} of the data's {_fmt(h['data_entropy'], '.3f')})")
    rule = ("" if h.get("data_entropy") is None else
            f"; settings whose entropy is off the data's by more than {h.get('entropy_tolerance', ENTROPY_TOLERANCE):.0%} "
            "(collapsed samples) are left out")
    lines = [f"{h['reference']} at {at(h['steps'])}: {name} {_fmt(h[h['metric']], spec)}{ent}, "
             f"{_fmt(h['seconds_per_sample'] * 1e3, '.3f')} ms/sample. The cheapest setting of every other model "
             f"that is at least as good ({'lower' if h['metric'] == 'gen_ppl' else 'higher'} is better{rule}):", "",
             f"| model | steps | {name} | entropy | ms/sample | × {h['reference']} time | best in sweep |",
             "|---|---|---|---|---|---|---|"]
    for label, o in h["others"].items():
        b = o["best"]
        best = "–" if b is None else f"{_fmt(b[h['metric']], spec)} at {at(b['steps'])} ({b['time_ratio']:.3g}×)"
        m = o["match"]
        if m is None:
            lines.append(f"| {label} | none in the sweep | | | | | {best} |")
        else:
            lines.append(f"| {label} | {m['steps']} | {_fmt(m[h['metric']], spec)} | {_fmt(m['entropy'], '.3f')} | "
                         f"{_fmt(m['seconds_per_sample'] * 1e3, '.3f')} | {m['time_ratio']:.3g} | {best} |")
    return lines + [""]


def markdown(result: dict) -> str:
    title = f"fmlm bench {result['preset']}" + (f" --ablation {result['ablation']}" if result["ablation"] else "")
    lines = [f"## {title}", ""]
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    desc = result["description"] + (f"; ablation: {result['ablation_description']}" if result["ablation"] else "")
    lines += [f"{desc}. {result['num_samples']} samples per setting, seed {result['seed']}, "
              f"{result['threads']} thread(s), torch {result['torch']}, commit {result['commit']}. "
              f"Data entropy {_fmt(result.get('data_entropy'), '.3f')} nats."
              + (f" Scorer: {result['scorer']['name']}." if result.get("scorer") else ""), ""]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    if result.get("notes"):
        lines.append("")
    lines += ["| model | run | steps | val metric | parameters |", "|---|---|---|---|---|"]
    for label, rec in result["variants"].items():
        vals = ", ".join(f"{k[4:]} {v:.4f}" for k, v in rec.items() if k.startswith("val_"))
        lines.append(f"| {label} | {rec['status']} | {rec.get('step')} | {vals} | {rec.get('parameters')} |")
    lines.append("")
    phr = any("valid_rate" in r for r in result["rows"])
    ppl = any("gen_ppl" in r for r in result["rows"])
    head = ["model", "steps", "NFE"]
    if phr:
        head += ["valid", "coverage"]
    if ppl:
        head += ["gen-PPL"]
    head += ["entropy", "ms/sample", "samples/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["label"], str(r["steps"]), str(r["nfe"])]
        if phr:
            cells += [_fmt(r.get("valid_rate"), ".3f"), _fmt(r.get("coverage"), ".3f")]
        if ppl:
            cells += [_fmt(r.get("gen_ppl"), ".2f")]
        cells += [_fmt(r["entropy"], ".3f"), _fmt(r["seconds_per_sample"] * 1e3, ".3f"),
                  _rate(r["samples_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    h = headline(result)
    if h is not None:
        lines += ["", *_headline_md(h)]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> list[Path]:
    """quality vs steps, quality vs seconds per sample (log x), entropy vs steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('fmlm: matplotlib is not installed; no plots (pip install "fmlm[eval]")', file=sys.stderr)
        return []
    rows = result["rows"]
    metric = "gen_ppl" if any("gen_ppl" in r for r in rows) else "valid_rate"
    qname = "gen-PPL (lower is better)" if metric == "gen_ppl" else "valid rate"
    labels = list(dict.fromkeys(r["label"] for r in rows))
    title = f"fmlm bench {result['preset']}" + (f" --ablation {result['ablation']}" if result["ablation"] else "")
    data_h = result.get("data_entropy")
    files = []
    for name, x, y, xlabel, ylabel in (
        ("quality_vs_steps.png", "nfe", metric, "network passes per sample (steps; AR: L)", qname),
        ("quality_vs_time.png", "seconds_per_sample", metric, "seconds per sample", qname),
        ("entropy_vs_steps.png", "nfe", "entropy", "network passes per sample (steps; AR: L)", "entropy (nats)"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        collapsed = False
        for label in labels:
            pts = [(r[x], r.get(y)) for r in rows if r["label"] == label and r.get(y) is not None]
            if not pts:
                continue
            xs, ys = zip(*sorted(pts))
            line, = ax.plot(xs, ys, marker="o", label=label)
            bad = [] if y == "entropy" else [(r[x], r[y]) for r in rows if r["label"] == label
                                              and r.get(y) is not None and _collapsed(r, data_h)]
            if bad:
                ax.plot(*zip(*bad), linestyle="none", marker="o", markersize=9, markerfacecolor="white",
                        color=line.get_color(), zorder=3)
                collapsed = True
        ax.set_xscale("log", base=2 if x == "nfe" else 10)
        if y == "gen_ppl":
            ax.set_yscale("log")
        if y == "entropy" and result.get("data_entropy") is not None:
            ax.axhline(result["data_entropy"], color="gray", linestyle="--", label="data")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        if collapsed:
            ax.text(0.01, 0.01, f"hollow: collapsed samples (entropy off the data's by more than "
                                f"{ENTROPY_TOLERANCE:.0%})",
                    transform=ax.transAxes, fontsize=7, color="dimgray", va="bottom")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(out / name)
    return files


def write_outputs(result: dict, out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    h = headline(result)
    if h is not None:
        result["headline"] = h
    if plots:
        result["plots"] = [p.name for p in plot(result, out)]
    write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown(result))


def report(folder: str | Path, plots: bool = True) -> dict:
    """Rewrite ``results.md``, the headline and the plots of a finished bench from its ``results.json``."""
    folder = Path(folder)
    path = folder / "results.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no results.json (the output folder of `fmlm bench PRESET`)")
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a bench result ({e})") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or "variants" not in result:
        raise ConfigError(f"{path}: not a bench result (no rows or variants)")
    try:
        write_outputs(result, folder, plots=plots)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a bench result (missing or malformed field {e})") from None
    return result


# ------------------------------------------------------------------ CLI
def describe(preset: BenchPreset, ablation: str | None, overrides: list[str],
             distill_overrides: list[str] | None = None) -> str:
    """The plan of a bench: every run's full config (``--dry-run``)."""
    variants = variants_for(ablation)
    lines = [f"bench {preset.name}: {preset.description}"]
    lines += [f"  {n}" for n in preset.notes]
    lines.append(f"steps {','.join(map(str, preset.steps))}; {preset.num_samples} samples; scorer {preset.scorer}")
    for v in variants:
        teacher = None if v.self_distill or not v.distilled else f"<checkpoint of {v.teacher}>"
        cfg = variant_config(preset, v, overrides, teacher, distill_overrides=distill_overrides)
        flat = {k: val for k, val in _flatten(cfg.to_dict()).items() if k not in ("preset",)}
        lines.append(f"--- {v.label} ({v.method})" + (f", distils {v.teacher}" if teacher else ""))
        lines.append(json.dumps(flat))
    return "\n".join(lines)


def add_arguments(p) -> None:
    from fmlm.cli import _positive, _steps_list

    p.add_argument("preset", metavar="PRESET", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")
    p.add_argument("--ablation", choices=list(ABLATIONS), help="run an ablation instead of the method comparison")
    p.add_argument("--steps", type=_steps_list, help="comma-separated step counts (default: 1,2,4,...,256,1024)")
    p.add_argument("--num-samples", "-n", type=_positive, help="samples per setting (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", help="gen-PPL scorer (gemma-3-270m, smollm2-135m, ar:RUN, HF name/dir, none)")
    p.add_argument("--scorer-batch", type=_positive, help="texts per scorer forward pass")
    p.add_argument("--sample-batch", type=_positive, help="samples per sampling call")
    p.add_argument("--out", help="output folder (default: runs/bench/PRESET[-ABLATION])")
    p.add_argument("--cache-dir", help="where trained runs are cached (default: $FMLM_CACHE/bench)")
    p.add_argument("--use", action="append", metavar="LABEL=RUN",
                   help="reuse a finished run for a variant (its config must match the bench's)")
    p.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the flow-map (distillation) runs only, e.g. max_steps=1000")
    p.add_argument("--only", help="comma-separated variant labels to sample (their teachers are still trained)")
    p.add_argument("--no-train", action="store_true", help="fail instead of training a missing run")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=_positive, help="CPU threads for training and sampling (fixed for timing)")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--dry-run", action="store_true", help="print every run's config and exit")
    p.add_argument("--force", action="store_true", help="run a GPU recipe (lm1b, owt) without a GPU")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def run(args, argv: list[str]) -> int:
    preset = get_preset(args.preset)
    for item in args.overrides + args.distill_set:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
    if args.dry_run:
        print(describe(preset, args.ablation, args.overrides, args.distill_set))
        return 0
    if preset.gpu_recipe and not args.force and not torch.cuda.is_available():
        raise ConfigError(f"bench {preset.name} is a GPU recipe ({preset.description}); see it with --dry-run, "
                          "or pass --force")
    command = "fmlm bench " + " ".join(shlex.quote(a) for a in argv)
    result = run_bench(args.preset, args.ablation, args.overrides, args.out, args.cache_dir, args.use, args.steps,
                       args.num_samples, args.seed, args.scorer, args.scorer_batch, args.sample_batch, args.threads,
                       args.device, args.only.split(",") if args.only else None, train=not args.no_train,
                       quiet=args.quiet, plots=not args.no_plots, command=command,
                       distill_overrides=args.distill_set)
    print(markdown(result))
    return 0
