"""A bench's rows read as evidence: the quality metric, the collapse rule, the reference rows and
the speed claim's headline (no rendering; :mod:`fmlm.bench.report` renders them).

The quality metric of a text bench is ``gen_bpb`` (the scorer's total NLL in bits per
UTF-8 byte of the decoded samples, independent of how the scorer tokenises); ``gen_ppl``
is reported beside it. The phrases task uses the exact valid rate. Older results files
without ``gen_bpb`` fall back to ``gen_ppl``.
"""

from __future__ import annotations

import math

#: Every decoded sample of a bench, one JSON object per line.
SAMPLES = "samples.jsonl"

#: A setting whose unigram entropy is off the data's by more than this fraction has collapsed.
ENTROPY_TOLERANCE = 0.1

#: Quality metrics in order of preference, and the ones where lower is better.
QUALITY = ("gen_bpb", "gen_ppl", "valid_rate")
LOWER_IS_BETTER = frozenset({"gen_bpb", "gen_ppl"})
_NAMES = {"gen_bpb": "bits/byte", "gen_ppl": "gen-PPL", "valid_rate": "valid rate"}
_SPECS = {"gen_bpb": ".3f", "gen_ppl": ".1f", "valid_rate": ".3f"}


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def _rate(x) -> str:
    """Samples per second with three significant figures, never in exponent form."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, ".0f") if x >= 100 else format(x, ".3g")


def quality_metric(result: dict) -> str | None:
    """The metric the headline and plots use: ``gen_bpb``, else ``gen_ppl``, else ``valid_rate``."""
    rows = result.get("rows", [])
    return next((m for m in QUALITY if any(r.get(m) is not None for r in rows)), None)


def _collapsed(row: dict, data_entropy, tolerance: float = ENTROPY_TOLERANCE) -> bool:
    """Whether a setting's unigram entropy is off the data's by more than ``tolerance`` of it."""
    if data_entropy is None or row.get("entropy") is None:
        return False
    return abs(row["entropy"] - data_entropy) > tolerance * data_entropy


def add_references(result: dict, references: dict) -> None:
    """Store the scored reference sets (see :func:`~fmlm.bench.metrics.score_references`)."""
    result["references"] = references
    result["data_bpb"] = references.get("data", {}).get("gen_bpb")
    result["shuffled_bpb"] = references.get("shuffled", {}).get("gen_bpb")


# ------------------------------------------------------------------ the headline
def headline(
    result: dict, reference: str = "FMLM", steps: int = 1, entropy_tolerance: float = ENTROPY_TOLERANCE
) -> dict | None:
    """The seed's speed claim, read off the rows: ``reference`` at ``steps`` against the rest.

    For every other model, the cheapest setting (least wall time per sample) whose
    quality is at least the reference's (bits per byte, or gen-PPL in older results, at or
    below it; valid rate at or above it on the phrases task), and its time as a multiple of
    the reference's. When the data's entropy is known, a setting whose unigram entropy is
    off by more than ``entropy_tolerance`` of it (a collapsed sampler: all spaces scores
    well under any LM) is not a match, and not a model's "best" either. A model with no
    match in the sweep gets ``match: None`` and its best setting instead. Returns ``None``
    when the rows hold no such reference setting or no quality metric.
    """
    rows = result.get("rows", [])
    metric = quality_metric(result)
    if metric is None:
        return None
    ref = next((r for r in rows if r["label"] == reference and r["steps"] == steps and r.get(metric) is not None), None)
    if ref is None:
        return None
    lower = metric in LOWER_IS_BETTER
    data_h = result.get("data_entropy")

    def healthy(r) -> bool:
        return not _collapsed(r, data_h, entropy_tolerance)

    def at_least_as_good(r) -> bool:
        q = r.get(metric)
        return q is not None and healthy(r) and (q <= ref[metric] if lower else q >= ref[metric])

    def brief(r) -> dict:
        return {
            "steps": r["steps"],
            "nfe": r["nfe"],
            metric: r[metric],
            "entropy": r.get("entropy"),
            "seconds_per_sample": r["seconds_per_sample"],
            "time_ratio": r["seconds_per_sample"] / ref["seconds_per_sample"],
        }

    out = {
        "reference": reference,
        "steps": steps,
        "metric": metric,
        metric: ref[metric],
        "entropy": ref.get("entropy"),
        "data_entropy": data_h,
        "entropy_tolerance": entropy_tolerance,
        "entropy_ok": healthy(ref),
        "seconds_per_sample": ref["seconds_per_sample"],
        "others": {},
    }
    for key in ("data_bpb", "shuffled_bpb"):
        if metric == "gen_bpb" and result.get(key) is not None:
            out[key] = result[key]
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
        out["others"][label] = {
            "match": brief(min(good, key=lambda r: r["seconds_per_sample"])) if good else None,
            "best": brief(best),
        }
    return out
