"""The outputs of a bench: the speed claim's headline, ``results.md``, plots, saved samples, re-scoring.

A finished bench folder holds ``results.json`` (every setting's row), ``results.md``
(the tables and the headline), three PNG plots and ``samples.jsonl`` (every decoded
sample of every setting, plus the two reference sets: held-out text and the same text
with its characters shuffled). :func:`report` re-renders the folder from its
``results.json``; :func:`fmlm.bench.rescore.rescore` scores its saved samples under
another scorer LM without sampling again.

The rows' logic (quality metric, collapse rule, headline) is in :mod:`fmlm.bench.rows`,
re-exported here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fmlm.bench.rows import (  # noqa: F401  (re-exported: the benches' rules, read by many modules)
    _NAMES,
    _SPECS,
    ENTROPY_TOLERANCE,
    LOWER_IS_BETTER,
    QUALITY,
    SAMPLES,
    _collapsed,
    _fmt,
    _rate,
    add_references,
    headline,
    quality_metric,
)
from fmlm.errors import ConfigError
from fmlm.io import write_text


def _headline_md(h: dict) -> list[str]:
    metric = h["metric"]
    name, spec = _NAMES[metric], _SPECS[metric]

    def at(n: int) -> str:
        return f"{n} step" + ("" if n == 1 else "s")

    ent = ""
    if h.get("entropy") is not None:
        ent = f", entropy {_fmt(h['entropy'], '.3f')}"
        if h.get("data_entropy") is not None:
            ent += (
                f" ({'within' if h.get('entropy_ok', True) else 'NOT within'} "
                f"{h.get('entropy_tolerance', ENTROPY_TOLERANCE):.0%} of the data's {_fmt(h['data_entropy'], '.3f')})"
            )
    refs = ""
    if h.get("data_bpb") is not None:
        refs = (
            f" (held-out text {_fmt(h['data_bpb'], spec)}, the same text with shuffled characters "
            f"{_fmt(h.get('shuffled_bpb'), spec)})"
        )
    tolerance = h.get("entropy_tolerance", ENTROPY_TOLERANCE)
    rule = (
        ""
        if h.get("data_entropy") is None
        else f"; settings whose entropy is off the data's by more than {tolerance:.0%} (collapsed samples) are left out"
    )
    lines = [
        f"{h['reference']} at {at(h['steps'])}: {name} {_fmt(h[metric], spec)}{refs}{ent}, "
        f"{_fmt(h['seconds_per_sample'] * 1e3, '.3f')} ms/sample. The cheapest setting of every other model "
        f"that is at least as good ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better{rule}):",
        "",
        f"| model | steps | {name} | entropy | ms/sample | × {h['reference']} time | best in sweep |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, o in h["others"].items():
        b = o["best"]
        best = "–" if b is None else f"{_fmt(b[metric], spec)} at {at(b['steps'])} ({b['time_ratio']:.3g}×)"
        m = o["match"]
        if m is None:
            lines.append(f"| {label} | none in the sweep | | | | | {best} |")
        else:
            lines.append(
                f"| {label} | {m['steps']} | {_fmt(m[metric], spec)} | {_fmt(m['entropy'], '.3f')} | "
                f"{_fmt(m['seconds_per_sample'] * 1e3, '.3f')} | {m['time_ratio']:.3g} | {best} |"
            )
    return lines + [""]


# ------------------------------------------------------------------ results.md
def _this_run(result: dict) -> list[str]:
    """What this bench changed from its preset's description, and how long its sampling bench took
    (a re-scored result keeps the wall time of the bench that drew its samples)."""
    parts = []
    changed = list(result.get("overrides") or []) + [f"distill {o}" for o in result.get("distill_overrides") or []]
    if changed:
        parts.append(
            "This bench overrides the preset with `" + " ".join(changed) + "`: the description above, "
            "its timing included, is for the preset's defaults."
        )
    if result.get("bench_seconds") is not None:
        reused = result.get("settings_reused") or 0
        parts.append(
            f"Measured wall time of the bench that drew these samples: {result['bench_seconds'] / 60:.0f} min"
            + (f" ({reused} setting(s) reused from the cache)." if reused else ".")
        )
    return [" ".join(parts), ""] if parts else []


def markdown(result: dict) -> str:
    title = f"fmlm bench {result['preset']}" + (f" --ablation {result['ablation']}" if result["ablation"] else "")
    lines = [f"## {title}", ""]
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    if result.get("rescored"):
        rs = result["rescored"]
        lines += [
            f"Re-scored from the saved samples of `{rs.get('from')}` (first scored by "
            f"{rs.get('from_scorer')}): `{rs.get('command')}`",
            "",
        ]
    desc = result["description"] + (f"; ablation: {result['ablation_description']}" if result["ablation"] else "")
    lines += [
        f"{desc}. {result['num_samples']} samples per setting, seed {result['seed']}, "
        f"{result['threads']} thread(s), torch {result['torch']}, commit {result['commit']}. "
        f"Data entropy {_fmt(result.get('data_entropy'), '.3f')} nats."
        + (f" Scorer: {result['scorer']['name']}." if result.get("scorer") else ""),
        "",
    ]
    lines += _this_run(result)
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    if result.get("notes"):
        lines.append("")
    lines += ["| model | run | steps | val metric | parameters |", "|---|---|---|---|---|"]
    for label, rec in result["variants"].items():
        vals = ", ".join(f"{k[4:]} {v:.4f}" for k, v in rec.items() if k.startswith("val_"))
        lines.append(f"| {label} | {rec['status']} | {rec.get('step')} | {vals} | {rec.get('parameters')} |")
    lines.append("")
    rows = result["rows"]
    phr = any("valid_rate" in r for r in rows)
    ppl = any("gen_ppl" in r for r in rows)
    bpb = any("gen_bpb" in r for r in rows)
    words = any("word_valid" in r for r in rows)
    head = ["model", "steps", "NFE"]
    if phr:
        head += ["valid", "coverage"]
    if bpb:
        head += ["bits/byte"]
    if ppl:
        head += ["gen-PPL"]
    if words:
        head += ["words"]
    head += ["entropy", "ms/sample", "samples/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    refs = result.get("references") or {}
    for name, title_ in (("data", "held-out text (reference)"), ("shuffled", "shuffled characters (reference)")):
        if name not in refs:
            continue
        ref = refs[name]
        cells = [title_, "–", "–"] + (["–", "–"] if phr else [])
        cells += ([_fmt(ref.get("gen_bpb"), ".3f")] if bpb else []) + ([_fmt(ref.get("gen_ppl"), ".2f")] if ppl else [])
        cells += [_fmt(result.get(f"{name}_word_valid"), ".3f")] if words else []
        cells += [_fmt(result.get("data_entropy"), ".3f") if name == "data" else "–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        cells = [r["label"], str(r["steps"]), str(r["nfe"])]
        if phr:
            cells += [_fmt(r.get("valid_rate"), ".3f"), _fmt(r.get("coverage"), ".3f")]
        if bpb:
            cells += [_fmt(r.get("gen_bpb"), ".3f")]
        if ppl:
            cells += [_fmt(r.get("gen_ppl"), ".2f")]
        if words:
            cells += [_fmt(r.get("word_valid"), ".3f")]
        cells += [_fmt(r["entropy"], ".3f"), _fmt(r["seconds_per_sample"] * 1e3, ".3f"), _rate(r["samples_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    if bpb:
        lines += [
            "",
            "bits/byte: the scorer's total NLL (up to and including the first EOS) in bits per UTF-8 "
            "byte of the decoded samples; read every row between the two reference rows."
            + (
                " words: the share of the samples' characters that are letters of words of the training text."
                if words
                else ""
            ),
        ]
    h = headline(result)
    if h is not None:
        lines += ["", *_headline_md(h)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plots
def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a one-line note) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('fmlm: matplotlib is not installed; no plots (pip install "fmlm[eval]")', file=sys.stderr)
        return None
    return plt


def plot(result: dict, out: Path) -> list[Path]:
    """quality vs steps, quality vs seconds per sample (log x), entropy vs steps."""
    plt = pyplot()
    if plt is None:
        return []
    rows = result["rows"]
    metric = quality_metric(result) or "valid_rate"
    qname = {
        "gen_bpb": "bits per byte under the scorer (lower is better)",
        "gen_ppl": "gen-PPL (lower is better)",
        "valid_rate": "valid rate",
    }[metric]
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
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            bad = (
                []
                if y == "entropy"
                else [
                    (r[x], r[y]) for r in rows if r["label"] == label and r.get(y) is not None and _collapsed(r, data_h)
                ]
            )
            if bad:
                ax.plot(
                    *zip(*bad),
                    linestyle="none",
                    marker="o",
                    markersize=9,
                    markerfacecolor="white",
                    color=line.get_color(),
                    zorder=3,
                )
                collapsed = True
        ax.set_xscale("log", base=2 if x == "nfe" else 10)
        if y == "gen_ppl":
            ax.set_yscale("log")
        if y == "entropy" and data_h is not None:
            ax.axhline(data_h, color="gray", linestyle="--", label="data")
        if y == "gen_bpb":
            if result.get("data_bpb") is not None:
                ax.axhline(result["data_bpb"], color="gray", linestyle="--", label="held-out text")
            if result.get("shuffled_bpb") is not None:
                ax.axhline(result["shuffled_bpb"], color="gray", linestyle=":", label="shuffled characters")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if collapsed:
            ax.text(
                0.01,
                0.01,
                f"hollow: collapsed samples (entropy off the data's by more than {ENTROPY_TOLERANCE:.0%})",
                transform=ax.transAxes,
                fontsize=7,
                color="dimgray",
                va="bottom",
            )
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(out / name)
    return files


# ------------------------------------------------------------------ files
def write_outputs(result: dict, out: Path, plots: bool = True, samples: list[dict] | None = None) -> None:
    """``results.json``, ``results.md``, the plots and (when given) ``samples.jsonl``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    h = headline(result)
    if h is not None:
        result["headline"] = h
    if samples is not None:
        write_text(out / SAMPLES, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        result["samples_file"] = SAMPLES
    if plots:
        result["plots"] = [p.name for p in plot(result, out)]
    write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    write_text(out / "results.md", markdown(result))


def read_result(folder: str | Path) -> dict:
    """The ``results.json`` of a finished bench, checked."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no results.json (the output folder of `fmlm bench PRESET`)")
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a bench result ({e})") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or "variants" not in result:
        raise ConfigError(f"{path}: not a bench result (no rows or variants)")
    return result


def report(folder: str | Path, plots: bool = True) -> dict:
    """Rewrite ``results.md``, the headline and the plots of a finished bench from its ``results.json``."""
    folder = Path(folder)
    result = read_result(folder)
    try:
        write_outputs(result, folder, plots=plots)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{folder / 'results.json'}: not a bench result (missing or malformed field {e})") from None
    return result
