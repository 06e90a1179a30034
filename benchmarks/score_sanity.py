"""Does a generative score rank the obvious cases? Real text, shuffled and random characters, all spaces.

    python benchmarks/score_sanity.py --text CORPUS.txt [--text ...] --scorer gemma-3-270m \
        [--num 128] [--chars 128] --out docs/results/score-sanity

For each text file: ``--num`` windows of ``--chars`` characters (evenly spaced over the
file), the same windows with their characters shuffled, random characters drawn
uniformly from the file's alphabet, and all spaces, each scored by ``gen_ppl`` (per
scorer token) and ``gen_bpb`` (bits per UTF-8 byte). A usable score ranks real text
first and shuffled or random characters far behind; all spaces is what the bench's
entropy rule (not the score) has to rule out. Writes ``sanity.json`` and ``sanity.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fmlm.bench.metrics import score_texts, shuffle_characters

CASES = ("real", "shuffled", "random", "spaces")


def windows(text: str, num: int, chars: int) -> list[str]:
    """``num`` windows of ``chars`` characters, evenly spaced over ``text`` (newlines kept)."""
    if len(text) < chars:
        raise ValueError(f"the text has {len(text)} characters, fewer than --chars {chars}")
    starts = np.linspace(0, len(text) - chars, num).astype(int)
    return [text[s : s + chars] for s in starts]


def cases(text: str, num: int, chars: int, seed: int = 0) -> dict[str, list[str]]:
    real = windows(text, num, chars)
    alphabet = sorted(set(text))
    rng = np.random.default_rng(seed)
    return {
        "real": real,
        "shuffled": [shuffle_characters(t, seed + i) for i, t in enumerate(real)],
        "random": ["".join(rng.choice(alphabet, len(t))) for t in real],
        "spaces": [" " * len(t) for t in real],
    }


def run(files: list[Path], scorer, num: int, chars: int, seed: int = 0, log=print) -> dict:
    out = {"scorer": scorer.describe(), "num": num, "chars": chars, "seed": seed, "texts": {}}
    for f in files:
        text = f.read_text(encoding="utf-8")
        res = {}
        for name, texts in cases(text, num, chars, seed).items():
            s = score_texts(texts, [False] * len(texts), scorer)
            res[name] = {k: s[k] for k in ("gen_bpb", "gen_ppl", "scored_tokens", "bytes")}
            log(
                f"{f.name} {name:>8}: {s['gen_bpb']:.3f} bits/byte, gen-PPL {s['gen_ppl']:.1f}, "
                f"{s['scored_tokens']} scorer tokens"
            )
        out["texts"][f.name] = res
    return out


def markdown(result: dict, command: str | None = None) -> str:
    lines = [f"Scorer {result['scorer']['name']}, {result['num']} windows of {result['chars']} characters per text."]
    if command:
        lines += ["", f"Command: `{command}`"]
    lines += ["", "| text | case | bits/byte | gen-PPL | scorer tokens | bytes |", "|---|---|---|---|---|---|"]
    for name, res in result["texts"].items():
        for case in CASES:
            r = res[case]
            lines.append(
                f"| {name} | {case} | {r['gen_bpb']:.3f} | {r['gen_ppl']:.1f} | {r['scored_tokens']} | {r['bytes']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from fmlm.bench.scorers import load_scorer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", action="append", required=True, type=Path, help="a UTF-8 text file (repeatable)")
    p.add_argument("--scorer", default="gemma-3-270m")
    p.add_argument("--num", type=int, default=128)
    p.add_argument("--chars", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    scorer = load_scorer(args.scorer)
    result = run(args.text, scorer, args.num, args.chars, args.seed, log=lambda m: print(m, file=sys.stderr))
    command = "python benchmarks/score_sanity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = command
    md = markdown(result, command)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sanity.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "sanity.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
