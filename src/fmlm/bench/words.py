"""Word validity: the share of a text's letters that belong to words of the training text.

A scorer-free check of the seed's "word salad" failure mode on real text. A word is a run
of letters (with inner apostrophes: ``o'er``), compared lower-cased with the words of the
training split. The figure is weighted by letters, not words, so that character soup
cannot score by splitting into many one-letter "words" (``a``, ``i``, ``o`` are words), and
a text with no letters at all (all spaces) scores 0. Held-out text scores near 1, its
shuffled characters low, random characters lower (tests/test_bench.py checks the order).
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
    """Letters inside known words over all letters of ``texts`` (0 when there are no letters)."""
    known = total = 0
    for t in texts:
        for w in words(t):
            n = len(w)
            total += n
            known += n if w in vocab else 0
    letters = sum(1 for t in texts for c in t if c.isalpha())  # letters outside any word (none) count too
    total = max(total, letters)
    return known / total if total else 0.0
