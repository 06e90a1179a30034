"""Held-out prefixes continued block by block past the model's block, scored given the prefix.

    python benchmarks/continuation.py --run FMLM=RUN_DIR:1 --run FLM=RUN_DIR:32 \\
        --run MDLM=RUN_DIR:8,32 ... [--num 128] [--length 256] [--prefix-tokens 32] \\
        [--context K] [--scorer smollm2-135m] [--threads 1] --out docs/results/long

For ``--num`` held-out lines (validation documents of the first run's dataset, lines at least
``--prefix-tokens`` long, evenly spaced), the line's first ``--prefix-tokens`` tokens (characters
for a char tokenizer) are the prefix, and every ``LABEL=RUN:STEPS`` setting writes a text of
``--length`` tokens (prefix included) with :meth:`fmlm.api.Model.generate` ``(length=...)``:
the first block continues the prefix, each next block the last ``--context`` tokens of the
previous one (:mod:`fmlm.long`). Scores (:func:`score_rows`):

* ``cond_bpb``: −log p(continuation | prefix) under the scorer, in bits per UTF-8 byte of the
  continuation (the scorer's NLL of the whole text minus that of the prefix alone);
* ``first_block_bpb`` / ``later_blocks_bpb``: the same split at the end of the first block: the
  first block's new tokens given the prefix, and the later blocks' tokens given all before them;
* ``gen_bpb``: the whole text's per-byte score (prefix included), as the bench reports it;
* ``entropy``: mean unigram entropy (nats) of the continuations' tokens;
* ``prefix_effect``: the share of the first block's free positions that are the same when the
  same seed is sampled without the prefix (1: the prefix changed nothing). A rerun of the same
  command adds it to settings measured without it.

The reference rows are the held-out text itself (each prefix's true continuation, the same
number of tokens) and that continuation with its characters shuffled. Results go to
``continuation.json`` (rewritten after every setting; a rerun with the same options keeps the
settings already measured) and ``continuation.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fmlm.api import load
from fmlm.bench.metrics import bits_per_byte, git_commit, shuffle_characters, unigram_entropy, utf8_bytes
from fmlm.bench.scorers import load_scorer
from fmlm.data.corpora import load_corpus
from fmlm.io import write_json, write_text
from fmlm.long import check_long_options, num_blocks
from fmlm.runtime import default_cache_dir


def parse_run(text: str) -> tuple[str, str, list[int]]:
    """``LABEL=RUN_DIR:STEPS[,STEPS]`` -> (label, run dir, steps)."""
    label, sep, rest = text.partition("=")
    path, sep2, steps = rest.rpartition(":")
    if not sep or not sep2 or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=RUN_DIR:STEPS[,STEPS], got {text!r}")
    try:
        return label, path, [int(s) for s in steps.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be integers in {text!r}") from None


def held_out(model, num: int, prefix_tokens: int, length: int) -> tuple[list[list[int]], list[list[int]]]:
    """``num`` held-out line starts: each one's first ``prefix_tokens`` ids and its first ``length`` ids.

    Candidates are the starts of validation lines with at least ``prefix_tokens`` characters whose
    document goes on for ``length`` tokens the tokenizer can encode; ``num`` of them evenly spaced."""
    d = model.config.data
    corpus = load_corpus(d.dataset, default_cache_dir(), d.val_fraction, d.seed)
    tok = model.tokenizer
    cands = []
    for doc in corpus.val:
        starts = [0] + [i + 1 for i, c in enumerate(doc) if c == "\n"]
        for s in starts:
            line = doc[s : doc.find("\n", s) if "\n" in doc[s:] else len(doc)]
            if len(line.strip()) >= prefix_tokens and len(line) >= prefix_tokens and len(doc) - s >= length:
                cands.append((doc, s))
    picks, out_prefix, out_text = np.linspace(0, len(cands) - 1, 4 * num).astype(int), [], []
    for j in picks:
        doc, s = cands[j]
        try:
            ids = list(tok.encode(doc[s : s + 4 * length]))
        except (KeyError, ValueError):
            continue  # a character outside the model's vocabulary
        head = list(tok.encode(doc[s : s + prefix_tokens]))
        if len(ids) < length or ids[:prefix_tokens] != head[:prefix_tokens] or len(head) < prefix_tokens:
            continue
        if tok.eos_id in ids[:length] or ids[:length] in out_text:
            continue
        out_prefix.append(ids[:prefix_tokens])
        out_text.append(ids[:length])
        if len(out_text) == num:
            break
    if len(out_text) < num:
        raise SystemExit(f"only {len(out_text)} held-out lines fit (asked for {num})")
    return out_prefix, out_text


def score_rows(tok, scorer, prompt_nll: float, prefixes, rows, ended, first_end: int) -> dict:
    """Scores of texts (token rows starting with their prefixes), see the module docstring.

    ``prompt_nll``: the scorer's summed NLL of the prefixes alone; ``first_end``: where the first
    block ends (the texts are also scored cut there, which splits the continuation's score into
    the first block's new tokens and the later blocks')."""
    prompts = [tok.decode(p) for p in prefixes]
    texts = [tok.decode(r) for r in rows]
    for p, t in zip(prompts, texts):
        if not t.startswith(p):
            raise ValueError(f"a text does not start with its prefix {p[:40]!r}")
    whole = scorer.score(texts, ended).nll
    b_prompt, b_whole = utf8_bytes(prompts), utf8_bytes(texts)
    out = {
        "cond_bpb": bits_per_byte(whole - prompt_nll, b_whole - b_prompt),
        "cond_bytes": b_whole - b_prompt,
        "gen_bpb": bits_per_byte(whole, b_whole),
        "ended_with_eos": float(np.mean(ended)) if len(ended) else 0.0,
    }
    if any(len(r) > first_end for r in rows):
        cuts = [tok.decode(r[:first_end]) for r in rows]
        cut = scorer.score(cuts, [bool(x) and len(r) < first_end for x, r in zip(ended, rows)]).nll
        b_cut = utf8_bytes(cuts)
        out["first_block_bpb"] = bits_per_byte(cut - prompt_nll, b_cut - b_prompt)
        out["later_blocks_bpb"] = bits_per_byte(whole - cut, b_whole - b_cut)
    cont = [r[len(p) :] for p, r in zip(prefixes, rows)]
    ent = [float(unigram_entropy(np.array(c))[0]) for c in cont if c]
    out.update(entropy=float(np.mean(ent)) if ent else 0.0, mean_tokens=float(np.mean([len(r) for r in rows])))
    return out


def prefix_effect(model, steps: int, known: torch.Tensor, seed: int) -> float:
    """Share of the first block's free positions that are the same with and without the prefix (same
    seed, same noise): near 1 means the sampler's output barely depends on the prefix."""
    cond = model.sample_ids(len(known), steps, seed, prefix=known)
    free = model.sample_ids(len(known), steps, seed)
    return float((cond[:, known.shape[1] :] == free[:, known.shape[1] :]).float().mean())


def run_setting(label, path, steps, prefixes, prompt_nll, args, scorer) -> dict:
    model = load(path, device="cpu")
    tok, block = model.tokenizer, model.config.data.seq_len
    context = check_long_options(args.length, args.context, block)
    known = torch.tensor(prefixes)
    model.generate(2, steps, 0, length=min(args.length, block + 1), context=context, prefix=known[:2])  # warm-up
    t0 = time.perf_counter()
    out = model.generate(len(prefixes), steps, args.seed, length=args.length, context=context, prefix=known)
    seconds = time.perf_counter() - t0
    rec = score_rows(tok, scorer, prompt_nll, prefixes, out.ids, out.ended, block)
    rec.update(
        label=label,
        run=Path(path).name,
        method=model.config.train.method,
        steps=steps,
        block=block,
        context=context,
        num_blocks=num_blocks(args.length, block, context),
        num_samples=len(out.ids),
        seconds_per_sample=seconds / len(prefixes),
        prefix_effect=prefix_effect(model, steps, known, args.seed),
        examples=[tok.decode(r) for r in out.ids[:3]],
        load_average=open("/proc/loadavg").read().split()[:3],
    )
    return rec


def references(tok, scorer, prompt_nll, prefixes, texts, block: int, seed: int) -> dict:
    """The held-out continuations themselves, and with their characters shuffled (prefix kept)."""
    shuffled = []
    for i, (p, t) in enumerate(zip(prefixes, texts)):
        head, cont = tok.decode(p), tok.decode(t[len(p) :])
        ids = list(tok.encode(head + shuffle_characters(cont, seed + i)))
        shuffled.append(ids[: len(t)])
    none = [False] * len(texts)
    return {
        "data": score_rows(tok, scorer, prompt_nll, prefixes, texts, none, block),
        "shuffled": score_rows(tok, scorer, prompt_nll, prefixes, shuffled, none, block),
    }


def command_line(args) -> str:
    """The command, with each run directory as ``$RUNS/<its name>`` (no machine paths in results)."""
    runs = " ".join(f"--run {label}=$RUNS/{Path(p).name}:{','.join(map(str, s))}" for label, p, s in args.run)
    opts = f"--num {args.num} --length {args.length} --prefix-tokens {args.prefix_tokens}"
    opts += f" --scorer {args.scorer} --seed {args.seed} --threads {args.threads}"
    opts += "" if args.context is None else f" --context {args.context}"
    return f"python benchmarks/continuation.py {runs} {opts} --out {args.out}"


def fmt(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(res: dict) -> str:
    o = res["options"]
    lines = [
        f"# Held-out Shakespeare continued block by block ({o['length']} tokens, prefix {o['prefix_tokens']})",
        "",
        f"{o['num']} held-out lines; each text is the line's first {o['prefix_tokens']} tokens (characters) "
        f"and {o['length'] - o['prefix_tokens']} generated ones, written block by block with context "
        f"{res.get('context')} (`fmlm sample --length {o['length']}`). Scorer `{o['scorer']}`. `cond_bpb`: bits "
        "per byte of the continuation given the prefix (lower is better), split into the first block's "
        "new tokens and the later blocks' (each given all before it); `gen_bpb`: the whole text, prefix "
        "included; `entropy`: unigram entropy (nats) of the continuation; `ended`: share that ended "
        "with EOS before the full length; `same without prefix`: share of the first block's free "
        "positions that are the same when the same seed is sampled without the prefix (near 1: the "
        "output barely depends on the prefix). Seconds per sample were measured on a shared, loaded "
        "machine (load average in the JSON): not a speed comparison.",
        "",
        "| setting | steps/block | blocks | s/sample | cond_bpb | first block | later blocks | gen_bpb "
        "| entropy | ended | same without prefix |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["references"].items():
        lines.append(
            f"| held-out text ({name}) | | | | {fmt(r['cond_bpb'])} | {fmt(r.get('first_block_bpb'))} "
            f"| {fmt(r.get('later_blocks_bpb'))} | {fmt(r['gen_bpb'])} | {fmt(r['entropy'], 2)} | | |"
        )
    for r in res["settings"].values():
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['num_blocks']} | {fmt(r['seconds_per_sample'], 2)} "
            f"| {fmt(r['cond_bpb'])} | {fmt(r.get('first_block_bpb'))} | {fmt(r.get('later_blocks_bpb'))} "
            f"| {fmt(r['gen_bpb'])} | {fmt(r['entropy'], 2)} | {fmt(r['ended_with_eos'], 2)} "
            f"| {fmt(r.get('prefix_effect'), 2)} |"
        )
    lines += ["", f"Machine: {res['environment']}", "", "Command:", "", "```", res["command"], "```", ""]
    for r in res["settings"].values():
        lines += [f"**{r['label']} {r['steps']} steps**, first text:", "", "```", r["examples"][0], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=parse_run, action="append", required=True, metavar="LABEL=RUN_DIR:STEPS")
    p.add_argument("--num", type=int, default=128)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--prefix-tokens", type=int, default=32)
    p.add_argument("--context", type=int)
    p.add_argument("--scorer", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    first = load(args.run[0][1], device="cpu")
    prefixes, texts = held_out(first, args.num, args.prefix_tokens, args.length)
    block = first.config.data.seq_len
    context = check_long_options(args.length, args.context, block)
    options = {k: getattr(args, k) for k in ("num", "length", "prefix_tokens", "context", "scorer", "seed")}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "continuation.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    res = old if old.get("options") == options else {"options": options, "settings": {}}
    res.update(
        context=context,
        command=command_line(args),
        commit=git_commit(),
        environment=f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), load average {open('/proc/loadavg').read().split()[:3]}",
    )
    scorer = load_scorer(args.scorer, device="cpu")
    print(f"{len(prefixes)} held-out prefixes, scorer {args.scorer} loaded", flush=True)
    prompts = [first.tokenizer.decode(p) for p in prefixes]
    prompt_nll = scorer.score(prompts, [False] * len(prompts)).nll
    if "references" not in res:
        res["references"] = references(first.tokenizer, scorer, prompt_nll, prefixes, texts, block, args.seed)
        write_json(path, res)
    todo = [(label, run, s) for label, run, steps in args.run for s in steps]
    for i, (label, run, steps) in enumerate(todo):
        key = f"{label}@{steps}"
        if key in res["settings"]:
            if "prefix_effect" not in res["settings"][key]:  # measured before the field existed
                known = torch.tensor(prefixes)
                res["settings"][key]["prefix_effect"] = prefix_effect(load(run, device="cpu"), steps, known, args.seed)
                write_json(path, res)
            continue
        t0 = time.perf_counter()
        res["settings"][key] = run_setting(label, run, steps, prefixes, prompt_nll, args, scorer)
        write_json(path, res)
        write_text(args.out / "continuation.md", markdown(res))
        r = res["settings"][key]
        print(
            f"[{i + 1}/{len(todo)}] {key}: cond_bpb {fmt(r['cond_bpb'])}, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    write_text(args.out / "continuation.md", markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
