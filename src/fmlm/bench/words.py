"""Word validity: the share of a text's characters that are letters of words of the training text.

A scorer-free check of the seed's "word salad" failure mode on real text. A word is a run
of letters (with inner apostrophes: ``o'er``), compared lower-cased with the words of the
training split. The figure counts letters, not words, so that character soup cannot score
by splitting into many one-letter "words" (``a``, ``i``, ``o`` are words), and it divides
by every character of the text (spaces and punctuation included), so that a degenerate
sample of spaces with a few stray letters scores near 0, not near 1. Held-out text scores
the data's own share of word letters (about 0.7 on Shakespeare), its shuffled characters
far less, random characters less again, all spaces 0 (tests/test_bench.py checks the order).
"""

from __future__ import annotations

import re

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``."""
    return [w.lower() for w in WORD.findall(text)]


def vocabulary(texts) -> frozenset[str]:
    """Every word of ``texts``."""
    out: set[str] = set()
    for t in texts:
        out.update(words(t))
    return frozenset(out)


def corpus_vocabulary(blocks, tokenizer, batch: int = 512) -> frozenset[str]:
    """The words of a split (e.g. ``data.train``), decoded block by block."""
    out: set[str] = set()
    for start in range(0, len(blocks), batch):
        ids = blocks.batch(list(range(start, min(start + batch, len(blocks)))))
        for row in ids.tolist():
            out.update(words(tokenizer.decode(row)))
    return frozenset(out)


def word_validity(texts, vocab: frozenset[str]) -> float:
    """Letters inside known words over all characters of ``texts`` (0 for no text at all)."""
    known = sum(len(w) for t in texts for w in words(t) if w in vocab)
    total = sum(len(t) for t in texts)
    return known / total if total else 0.0
