"""``fmlm bench rescore DIR --scorer NAME``: score a finished bench's saved samples under another scorer.

A bench saves every decoded sample (and the two reference sets) in ``samples.jsonl``;
re-scoring needs no model and no sampling, so a bench sampled on one machine (a GPU
without the scorers, say) can be scored on another, and under several scorers.
"""

from __future__ import annotations

import json
from pathlib import Path

from fmlm.bench.metrics import score_references, score_texts
from fmlm.bench.report import SAMPLES, _fmt, add_references, read_result, write_outputs
from fmlm.errors import ConfigError


def read_samples(folder: str | Path) -> list[dict]:
    """The saved samples of a bench (``samples.jsonl``), checked."""
    path = Path(folder) / SAMPLES
    if not path.is_file():
        raise ConfigError(
            f"{folder}: no {SAMPLES} (benches before per-byte scoring kept only 3 texts per "
            "setting; run the bench again to re-score it)"
        )
    out = []
    try:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            s = json.loads(line)
            if not (
                isinstance(s, dict)
                and isinstance(s.get("text"), str)
                and isinstance(s.get("ended"), bool)
                and isinstance(s.get("label"), str)
                and isinstance(s.get("index"), int)
            ):
                raise ValueError(f"line {n} is not a sample")
            out.append(s)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not a samples file ({e})") from None
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(name).name or name).strip("-") or "scorer"


def rescore(
    folder: str | Path, scorer, out: str | Path | None = None, plots: bool = True, command: str | None = None, log=None
) -> tuple[dict, Path]:
    """Score a finished bench's saved samples under ``scorer`` (a loaded scorer) without resampling.

    Every row gets the new ``gen_ppl``, ``gen_bpb`` and token counts (entropy and timings
    are the sampled ones), the reference rows are scored again, and the results go to
    ``out`` (default: a sibling folder ``DIR-<scorer>``; ``out`` = ``DIR`` rewrites it in
    place) with a copy of ``samples.jsonl``. Returns the new results and their folder.
    """
    log = log or (lambda msg: None)
    folder = Path(folder)
    result = read_result(folder)
    samples = read_samples(folder)
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault((s["label"], s.get("steps")), []).append(s)
    for key in groups:
        groups[key].sort(key=lambda s: s["index"])
    missing = [
        f"{r['label']} at {r['steps']} steps"
        for r in result["rows"]
        if len(groups.get((r["label"], r["steps"]), [])) != r.get("num_samples")
    ]
    if missing:
        raise ConfigError(f"{folder / SAMPLES}: the samples of {', '.join(missing[:3])} are missing or incomplete")
    old = (result.get("scorer") or {}).get("name")
    for i, r in enumerate(result["rows"], 1):
        g = groups[(r["label"], r["steps"])]
        r.update(score_texts([s["text"] for s in g], [s["ended"] for s in g], scorer))
        log(f"[{i}/{len(result['rows'])}] {r['label']} {r['steps']} steps: {_fmt(r['gen_bpb'], '.3f')} bits/byte")
    refs = {
        name: ([s["text"] for s in groups[(name, None)]], [s["ended"] for s in groups[(name, None)]])
        for name in ("data", "shuffled")
        if (name, None) in groups
    }
    if refs:
        add_references(result, score_references(refs, scorer))
    result["scorer"] = scorer.describe()
    result["metric"] = "gen_bpb"
    result["rescored"] = {"from": str(folder), "from_scorer": old, "command": command}
    dest = Path(out) if out else folder.with_name(f"{folder.name}-{_slug(result['scorer']['name'])}")
    write_outputs(result, dest, plots=plots, samples=samples)
    return result, dest
