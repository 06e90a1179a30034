"""``fmlm bench rescore DIR --scorer NAME``: score a finished bench's saved samples under another scorer.

A bench saves every decoded sample (and the two reference sets) in ``samples.jsonl``;
re-scoring needs no model and no sampling, so a bench sampled on one machine (a GPU
without the scorers, say) can be scored on another, and under several scorers.

Re-scoring resumes: each scored row is saved at once in ``OUT/rescore-partial.json``
(with the scorer and a checksum of the samples), so a killed re-scoring goes on from
the rows it had scored; the file is removed when the results are written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fmlm.bench.metrics import score_references, score_texts
from fmlm.bench.report import SAMPLES, _fmt, add_references, read_result, write_outputs
from fmlm.errors import ConfigError
from fmlm.io import write_json

#: Rows scored so far by an unfinished re-scoring (removed once the results are written).
PARTIAL = "rescore-partial.json"


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
    checksum = hashlib.sha256((folder / SAMPLES).read_bytes()).hexdigest()
    identity = {"scorer": scorer.describe(), "samples_sha256": checksum}
    dest = Path(out) if out else folder.with_name(f"{folder.name}-{_slug(identity['scorer']['name'])}")
    partial_path = dest / PARTIAL
    done = _read_partial(partial_path, identity, log)
    for i, r in enumerate(result["rows"], 1):
        key = f"{r['label']}|{r['steps']}"
        if key not in done:
            g = groups[(r["label"], r["steps"])]
            done[key] = score_texts([s["text"] for s in g], [s["ended"] for s in g], scorer)
            dest.mkdir(parents=True, exist_ok=True)
            write_json(partial_path, {**identity, "rows": done})
        r.update(done[key])
        log(f"[{i}/{len(result['rows'])}] {r['label']} {r['steps']} steps: {_fmt(r['gen_bpb'], '.3f')} bits/byte")
    refs = {
        name: ([s["text"] for s in groups[(name, None)]], [s["ended"] for s in groups[(name, None)]])
        for name in ("data", "shuffled")
        if (name, None) in groups
    }
    if refs:
        add_references(result, score_references(refs, scorer))
    result["scorer"] = identity["scorer"]
    result["metric"] = "gen_bpb"
    result["rescored"] = {"from": str(folder), "from_scorer": old, "command": command}
    write_outputs(result, dest, plots=plots, samples=samples)
    partial_path.unlink(missing_ok=True)
    return result, dest


def _read_partial(path: Path, identity: dict, log) -> dict:
    """The rows an unfinished re-scoring of the same samples under the same scorer saved."""
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        rows = saved["rows"]
        same = saved["scorer"] == identity["scorer"] and saved["samples_sha256"] == identity["samples_sha256"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        log(f"{path}: unreadable, the re-scoring starts from the first row")
        return {}
    if not (same and isinstance(rows, dict)):
        log(f"{path}: left by another scorer or other samples, the re-scoring starts from the first row")
        return {}
    log(f"{path}: resuming, {len(rows)} row(s) scored earlier")
    return rows
