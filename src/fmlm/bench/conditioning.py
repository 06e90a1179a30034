"""Measurements of training-time conditioning: ``python -m fmlm.bench.conditioning TASK ...``.

Tasks (each writes ``<out>/<name>.json`` and ``<out>/<name>.md``), on phrases models:

* ``prefix``: conditioned on the first token of each phrase in turn, the share of samples whose
  first phrase is completed into that phrase and the whole-sequence valid rate, for each sampling
  mode of the known tokens (``learned``: the model's learned conditioning, :mod:`fmlm.conditioning`;
  ``steer``: the sampling-time steering of :mod:`fmlm.guidance`).
* ``cfg``: the same class prefix with classifier-free guidance at each weight w: the target share
  (the completion rate: first phrase = the prefixed one's) and the valid rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fmlm.api import load
from fmlm.bench.guidance import _first_phrase_rate, _markdown
from fmlm.io import write_json


def _prefixed(m, steps: int, n: int, seed: int, **options) -> dict:
    """Completion (target share) and valid rate over the task's phrases, ``n`` samples each."""
    task = m.task
    if task is None:
        raise SystemExit(f"{m.path} is not a phrases model")
    t0 = time.perf_counter()
    rates, valid = [], []
    for j, phrase in enumerate(tqdm(task.phrases, desc=f"{m.path.name} {steps} steps {options}", leave=False)):
        ids = m.sample_ids(n, steps, seed + j, known=[phrase[0]], **options)
        rates.append(_first_phrase_rate(task, ids, j))
        valid.append(task.check(ids)["valid_rate"])
    return {
        "steps": steps,
        "samples": n * task.n,
        "completion_rate": float(np.mean(rates)),
        "min_completion_rate": float(np.min(rates)),
        "valid_rate": float(np.mean(valid)),
        "seconds_per_sample": (time.perf_counter() - t0) / (n * task.n),
    }


def bench(task: str, models: list[str], steps: list[list[int]], settings: list, n: int, seed: int) -> dict:
    """``prefix``: one row per (model, steps, mode in ``settings``); ``cfg``: per guidance weight."""
    rows = []
    for path, model_steps in zip(models, steps):
        m = load(path, device="cpu")
        for s in model_steps:
            for v in settings:
                key, opts = ("mode", {"cond_mode": v}) if task == "prefix" else ("w", {"cfg_weight": v})
                rec = {"model": path, "method": m.config.train.method, key: v}
                rec.update(_prefixed(m, s, n, seed, **opts))
                rows.append(rec)
                print(json.dumps(rec), file=sys.stderr)
    return {"task": task, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fmlm.bench.conditioning", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=["prefix", "cfg"])
    p.add_argument("--models", nargs="+", required=True, help="phrases run directories")
    p.add_argument(
        "--steps", nargs="+", default=["1"], help="comma-separated steps, one list per model (or one for all)"
    )
    p.add_argument("--modes", default="learned,steer", help="prefix: comma-separated modes")
    p.add_argument("--weights", default="0,1,2,4", help="cfg: comma-separated weights")
    p.add_argument("-n", type=int, default=128, help="samples per phrase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--name", help="output file stem (default: the task)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    steps = [[int(s) for s in x.split(",")] for x in a.steps]
    if len(steps) == 1:
        steps = steps * len(a.models)
    if len(steps) != len(a.models):
        p.error("--steps: one list for all models or one per model")
    settings = a.modes.split(",") if a.task == "prefix" else [float(w) for w in a.weights.split(",")]
    res = bench(a.task, a.models, steps, settings, a.n, a.seed)
    res["command"] = "python -m fmlm.bench.conditioning " + " ".join(sys.argv[1:] if argv is None else argv)
    _write(res, Path(a.out), a.name or a.task)
    return 0


def _write(res: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", res)
    md = _markdown(res)
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
