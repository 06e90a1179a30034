"""Splitting texts into documents and documents into train/validation (by hash, or by the tail of one text)."""

from __future__ import annotations

import re

from fmlm.data.corpora.corpus import _nonblank, _stable_unit
from fmlm.errors import DataError

# Gutenberg's markers vary ("*** START OF THIS PROJECT GUTENBERG EBOOK X ***",
# "***START OF THE PROJECT GUTENBERG EBOOK***", ...): match on the "*** START OF" head.
_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF\b", re.IGNORECASE)


_GUTENBERG_SMALL_PRINT_END = re.compile(r"^\s*\*END\*\s*THE SMALL PRINT", re.IGNORECASE)


_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF\b|END OF (THE )?PROJECT GUTENBERG)",
    re.IGNORECASE,
)


_WIKITEXT_TITLE = re.compile(r"^ ?= (?!=).*(?<!=) = ?$")


def _tail_split(doc: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """Split one document: its last ``val_fraction`` of characters, cut at a newline."""
    target = int(len(doc) * (1.0 - val_fraction))
    # Cut just after a newline (training keeps it) so that train + val == doc.
    newline = doc.rfind("\n", 0, target)
    if newline < 0:
        newline = doc.find("\n", target)
    cut = newline + 1 if 0 <= newline < len(doc) - 1 else target
    train, val = doc[:cut], doc[cut:]
    if not train.strip() or not val.strip():
        raise DataError("corpus is a single document too short to split into train and validation")
    return [train], [val]


def _hash_split(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str], str]:
    """Hold out whole documents whose stable hash falls below ``val_fraction``.

    Returns:
        ``(train, val, method)``; at least one document lands on each side, and a
        single document is split by characters instead.
    """
    if len(docs) == 1:
        train, val = _tail_split(docs[0], val_fraction)
        return train, val, "tail of the single document"
    scores = [_stable_unit(seed, i, doc[:64]) for i, doc in enumerate(docs)]
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        is_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val, "documents held out by stable hash"


def split_wikitext_articles(text: str) -> list[str]:
    """Split WikiText into articles at top-level ``= Title =`` lines.

    Section headings (``= = Section = =``) stay inside their article; the title
    line is kept as the article's first line.
    """
    articles: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if _WIKITEXT_TITLE.match(line) and current:
            articles.append("\n".join(current).strip())
            current = []
        current.append(line)
    if current:
        articles.append("\n".join(current).strip())
    return _nonblank(articles)


def _split_tinystories(text: str) -> list[str]:
    return _nonblank([story.strip() for story in text.split("<|endoftext|>")])


def _split_lines(text: str) -> list[str]:
    return _nonblank([line.strip() for line in text.split("\n")])


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and footer, if present.

    Drops everything up to and including a ``*** START OF ...`` line (or the older
    ``*END*THE SMALL PRINT`` line) and everything from a ``*** END OF ...`` or
    ``End of (the) Project Gutenberg ...`` line on. Text without
    these markers is returned unchanged apart from surrounding blank lines.
    """
    lines = text.split("\n")
    start = 0
    for i, line in enumerate(lines):
        if _GUTENBERG_START.match(line):
            start = i + 1
            break
    else:
        for i, line in enumerate(lines):
            if _GUTENBERG_SMALL_PRINT_END.match(line):
                start = i + 1
                break
    end = len(lines)
    for i in range(start, len(lines)):
        if _GUTENBERG_END.match(lines[i]):
            end = i
            break
    return "\n".join(lines[start:end]).strip("\n")
