"""Measurements of conditioning and guidance: ``python -m fmlm.guidance_bench TASK ...``.

Tasks (each writes ``<out>/<task>.json``, ``<out>/<task>.md`` and, where a plot helps,
``<out>/<task>.png``):

* ``prefix``: phrases models conditioned on the first token of each phrase; the share of
  samples whose first phrase is completed into that phrase, and the valid rate.
* ``reward``: phrases flow models steered by a phrase classifier toward each phrase family;
  the target family's share and the valid rate, against the unguided share.
* ``autoguide``: real-text flow models with a weak model, as a function of w: the mean
  per-sample entropy of the generated tokens and, with ``--scorer-ngram``, the generative
  perplexity under a character n-gram model fitted on the training split (a cheap scorer;
  not a neural LM).
* ``attribute``: real-text flow models with a keyword classifier: the attribute rate with
  and without reward guidance (and the same entropy / n-gram perplexity).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fmlm.api import Model, load
from fmlm.io import write_json


def sample_entropy(ids: torch.Tensor) -> float:
    """Mean over samples of the entropy (nats) of the sample's own token histogram."""
    out = []
    for row in ids:
        _, counts = torch.unique(row, return_counts=True)
        p = counts.double() / counts.sum()
        out.append(float(-(p * p.log()).sum()))
    return float(np.mean(out))


class CharNgram:
    """Interpolated Witten–Bell character n-gram LM over token ids (a cheap gen-PPL scorer)."""

    def __init__(self, ids: np.ndarray, vocab_size: int, order: int = 5):
        self.V, self.order = vocab_size, order
        ids = np.asarray(ids, dtype=np.int64)
        self.tables = []  # per context length k: dict context-code -> (counts over V, total, distinct)
        for k in range(order):
            if k == 0:
                counts = np.bincount(ids, minlength=vocab_size).astype(np.float64)
                self.tables.append({0: counts})
                continue
            ctx = np.zeros(len(ids) - k, dtype=np.int64)
            for j in range(k):
                ctx = ctx * vocab_size + ids[j : len(ids) - k + j]
            nxt = ids[k:]
            keys, inv = np.unique(ctx, return_inverse=True)
            table = np.zeros((len(keys), vocab_size))
            np.add.at(table, (inv, nxt), 1.0)
            self.tables.append(dict(zip(keys.tolist(), table)))

    def nll(self, seq: list[int]) -> float:
        """Mean negative log-likelihood per token (nats) of one sequence."""
        total = 0.0
        for i, c in enumerate(seq):
            p = np.full(self.V, 1.0 / self.V)
            for k in range(0, min(i, self.order - 1) + 1):
                code = 0
                for j in range(i - k, i):
                    code = code * self.V + seq[j]
                counts = self.tables[k].get(code)
                if counts is None:
                    break
                n, d = counts.sum(), (counts > 0).sum()
                p = (counts + d * p) / (n + d)
            total -= math.log(max(p[c], 1e-12))
        return total / len(seq)

    def ppl(self, ids: torch.Tensor) -> float:
        return float(math.exp(np.mean([self.nll(row) for row in ids.tolist()])))


def _first_phrase_rate(task, ids: torch.Tensor, j: int) -> float:
    return float((task.labels(ids) == j).float().mean())


def bench_prefix(models: list[str], steps: list[int], n: int, seed: int) -> dict:
    rows = []
    for path in models:
        m = load(path, device="cpu")
        task = m.task
        for s in steps:
            t0 = time.perf_counter()
            rates, valid = [], []
            for j, phrase in enumerate(tqdm(task.phrases, desc=f"{Path(path).name} {s} steps", leave=False)):
                ids = m.sample_ids(n, s, seed + j, known=[phrase[0]])
                rates.append(_first_phrase_rate(task, ids, j))
                valid.append(task.check(ids)["valid_rate"])
            rows.append(
                {
                    "model": str(path),
                    "method": m.config.train.method,
                    "steps": s,
                    "n_per_phrase": n,
                    "completion_rate": float(np.mean(rates)),
                    "min_completion_rate": float(np.min(rates)),
                    "valid_rate": float(np.mean(valid)),
                    "seconds_per_sample": (time.perf_counter() - t0) / (n * task.n),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return {"task": "prefix", "rows": rows}


def bench_reward(
    model: str, classifier: str, steps: list[int], scales: list[float], iters: int, n: int, seed: int
) -> dict:
    m, clf = load(model, device="cpu"), load(classifier, device="cpu")
    task = m.task
    rows = []
    for s in steps:
        for scale in [0.0, *scales]:
            t0 = time.perf_counter()
            shares, valid = [], []
            for j in tqdm(range(task.n), desc=f"{s} steps, scale {scale}", leave=False):
                opts = {} if scale == 0 else dict(classifier=clf, target=j, reward_scale=scale, reward_iters=iters)
                ids = m.sample_ids(n, s, seed + j, **opts)
                shares.append(_first_phrase_rate(task, ids, j))
                valid.append(task.check(ids)["valid_rate"])
            rows.append(
                {
                    "steps": s,
                    "reward_scale": scale,
                    "reward_iters": iters if scale else 0,
                    "n_per_target": n,
                    "target_share": float(np.mean(shares)),
                    "min_target_share": float(np.min(shares)),
                    "valid_rate": float(np.mean(valid)),
                    "seconds_per_sample": (time.perf_counter() - t0) / (n * task.n),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return {"task": "reward", "model": model, "classifier": classifier, "chance": 1.0 / task.n, "rows": rows}


def _scorer(model: Model, order: int):
    if order <= 0:
        return None
    from fmlm.train import load_data

    data = load_data(model.config, model.tokenizer)
    train = data.train.batch(list(range(len(data.train)))).flatten().numpy()
    return CharNgram(train, model.config.model.vocab_size, order)


def _text_record(rec: dict, model: Model, ids: torch.Tensor, t0: float, scorer, ngram: int) -> dict:
    """Add the real-text metrics (entropy, time, n-gram gen-PPL, one example) to ``rec`` and log it."""
    rec.update(entropy=sample_entropy(ids), seconds_per_sample=(time.perf_counter() - t0) / len(ids))
    if scorer is not None:
        rec[f"ngram{ngram}_ppl"] = scorer.ppl(ids)
    rec["example"] = model.decode(ids[:1])[0]
    print(json.dumps(rec), file=sys.stderr)
    return rec


def bench_autoguide(
    models: list[str], weaks: list[str], steps: list[int], weights: list[float], n: int, seed: int, ngram: int
) -> dict:
    rows = []
    scorer = None
    for path, weak_path, s in zip(models, weaks, steps):
        m, weak = load(path, device="cpu"), load(weak_path, device="cpu")
        scorer = scorer or _scorer(m, ngram)
        for w in tqdm(weights, desc=Path(path).name, leave=False):
            t0 = time.perf_counter()
            ids = m.sample_ids(n, s, seed, guide_weak=weak, guide_weight=w)
            rows.append(
                _text_record(
                    {"model": path, "weak": weak_path, "steps": s, "w": w, "num_samples": n}, m, ids, t0, scorer, ngram
                )
            )
    return {"task": "autoguide", "rows": rows}


def bench_attribute(
    models: list[str],
    classifier: str,
    target: str,
    steps: list[int],
    scales: list[float],
    iters: int,
    n: int,
    seed: int,
    ngram: int,
) -> dict:
    clf = load(classifier, device="cpu")
    rows = []
    scorer = None
    for path, s in zip(models, steps):
        m = load(path, device="cpu")
        scorer = scorer or _scorer(m, ngram)
        for scale in tqdm([0.0, *scales], desc=Path(path).name, leave=False):
            t0 = time.perf_counter()
            opts = {} if scale == 0 else dict(classifier=clf, target=target, reward_scale=scale, reward_iters=iters)
            ids = m.sample_ids(n, s, seed, **opts)
            rate = float((clf.labels(ids) == clf.class_index(target)).float().mean())
            rows.append(
                _text_record(
                    {
                        "model": path,
                        "steps": s,
                        "reward_scale": scale,
                        "reward_iters": iters if scale else 0,
                        "num_samples": n,
                        "attribute_rate": rate,
                    },
                    m,
                    ids,
                    t0,
                    scorer,
                    ngram,
                )
            )
    return {"task": "attribute", "classifier": classifier, "target": target, "rows": rows}


def _markdown(result: dict) -> str:
    rows = result["rows"]
    keys = [k for k in rows[0] if k not in ("example",)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'fmlm[plot]'): no plot written", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    task = result["task"]
    if task == "autoguide":
        fig, axes = plt.subplots(
            1, 2 if any(k.endswith("_ppl") for k in rows[0]) else 1, figsize=(10, 4), squeeze=False
        )
        ppl_key = next((k for k in rows[0] if k.endswith("_ppl")), None)
        for model in dict.fromkeys(r["model"] for r in rows):
            rs = [r for r in rows if r["model"] == model]
            label = f"{Path(model).name} ({rs[0]['steps']} steps)"
            axes[0][0].plot([r["w"] for r in rs], [r["entropy"] for r in rs], "o-", label=label)
            if ppl_key:
                axes[0][1].plot([r["w"] for r in rs], [r[ppl_key] for r in rs], "o-", label=label)
        axes[0][0].set(xlabel="guidance weight w", ylabel="sample entropy (nats)")
        if ppl_key:
            axes[0][1].set(xlabel="guidance weight w", ylabel=ppl_key.replace("_", " "))
        axes[0][0].legend()
    elif task == "reward":
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in dict.fromkeys(r["steps"] for r in rows):
            rs = [r for r in rows if r["steps"] == s]
            ax.plot([r["reward_scale"] for r in rs], [r["target_share"] for r in rs], "o-", label=f"share, {s} steps")
            ax.plot([r["reward_scale"] for r in rs], [r["valid_rate"] for r in rs], "x--", label=f"valid, {s} steps")
        ax.axhline(result["chance"], color="gray", lw=0.8)
        ax.set(xlabel="reward scale", ylabel="rate", ylim=(0, 1.02))
        ax.legend()
    else:
        return
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fmlm.guidance_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=["prefix", "reward", "autoguide", "attribute"])
    p.add_argument("--models", nargs="+", required=True, help="run directories")
    p.add_argument("--weak", nargs="+", default=[], help="autoguide: one weak run per model")
    p.add_argument("--classifier", help="reward/attribute: classifier run")
    p.add_argument("--target", default="1", help="attribute: target class")
    p.add_argument("--steps", default="1", help="comma-separated; autoguide/attribute: one per model")
    p.add_argument("--weights", default="0,0.5,1,2,3")
    p.add_argument("--scales", default="0.5,1,2")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("-n", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer-ngram", type=int, default=0, help="order of the n-gram gen-PPL scorer (0: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--name", help="output file stem (default: the task)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    steps = [int(s) for s in a.steps.split(",")]
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    if a.task == "prefix":
        res = bench_prefix(a.models, steps, a.n, a.seed)
    elif a.task == "reward":
        res = bench_reward(a.models[0], a.classifier, steps, floats(a.scales), a.iters, a.n, a.seed)
    elif a.task == "autoguide":
        res = bench_autoguide(a.models, a.weak, steps, floats(a.weights), a.n, a.seed, a.scorer_ngram)
    else:
        res = bench_attribute(
            a.models, a.classifier, a.target, steps, floats(a.scales), a.iters, a.n, a.seed, a.scorer_ngram
        )
    res["command"] = "python -m fmlm.guidance_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.name or a.task
    write_json(out / f"{stem}.json", res)
    (out / f"{stem}.md").write_text(_markdown(res))
    _plot(res, out / f"{stem}.png")
    print(_markdown(res))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
