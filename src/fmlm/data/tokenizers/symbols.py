"""Tokenizers over a fixed symbol list: characters (:class:`CharTokenizer`) and words (:class:`WordTokenizer`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmlm.data.tokenizers.base import EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, Tokenizer, _hash_hex
from fmlm.errors import DataError
from fmlm.io import write_text


class _SymbolTokenizer(Tokenizer):
    """Shared machinery of vocabularies that are an explicit list of symbols."""

    def __init__(self, symbols: Sequence[str], spec: str, add_unk: bool) -> None:
        base = list(symbols)
        specials = [EOS_TOKEN, PAD_TOKEN] + ([UNK_TOKEN] if add_unk else [])
        clash = sorted(set(base) & set(specials))
        if clash:
            raise DataError(f"vocabulary symbols clash with reserved specials: {clash}")
        if len(set(base)) != len(base):
            raise DataError("vocabulary symbols must be distinct")
        if not base:
            raise DataError(f"tokenizer {spec!r} has an empty vocabulary")
        self.spec = spec
        self.symbols: list[str] = base + specials
        self.num_base = len(base)
        # Specials come after the base symbols so that the base ids are 0..n-1.
        self.eos_id = len(base)
        self.pad_id = len(base) + 1
        self.unk_id: int | None = len(base) + 2 if add_unk else None
        self.vocab_size = len(self.symbols)
        self._index = {s: i for i, s in enumerate(base)}

    def _decode_plain(self, ids: list[int]) -> str:
        sep = " " if self._space_joined else ""
        return sep.join(self.symbols[i] for i in ids)

    def _compute_fingerprint(self) -> str:
        return _hash_hex(json.dumps([self._kind(), self.symbols]))

    def _save_files(self, directory: Path) -> dict[str, Any]:
        vocab = {"symbols": self.symbols[: self.num_base], "add_unk": self.unk_id is not None}
        write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        return {}


class CharTokenizer(_SymbolTokenizer):
    """Character-level tokenizer: one id per Unicode code point.

    Ids ``0..C-1`` are the characters in sorted order, then ``<eos>``, ``<pad>``
    and ``<unk>`` (for characters unseen in the training texts).

    Args:
        chars: The characters of the vocabulary (each a single code point).
    """

    def __init__(self, chars: Sequence[str]) -> None:
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise DataError(f"char vocabulary entries must be single characters: {bad[:5]}")
        super().__init__(chars, "char", add_unk=True)
        self._unk = len(chars) + 2  # = unk_id, typed as a plain int for numpy
        # A dense code point -> id table makes encoding a single numpy gather.
        table_size = max(ord(c) for c in chars) + 1
        self._table = np.full(table_size, self._unk, dtype=np.int64)
        for i, c in enumerate(chars):
            self._table[ord(c)] = i

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """Vocabulary = sorted set of the characters of ``texts``."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise DataError("cannot build a char tokenizer from empty training texts")
        return cls(sorted(chars))

    def _kind(self) -> str:
        return "char"

    def _codepoints_to_ids(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        codes = codes.astype(np.int64)
        known = codes < len(self._table)
        return np.where(known, self._table[np.where(known, codes, 0)], self._unk)

    def encode(self, text: str) -> list[int]:
        return self._codepoints_to_ids(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        # One code point is one id, so lengths are the string lengths and the
        # whole batch is one vectorised lookup.
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        return self._codepoints_to_ids("".join(texts)), lengths


class WordTokenizer(_SymbolTokenizer):
    """Whitespace-separated word-level tokenizer over an explicit vocabulary.

    Ids ``0..W-1`` are ``symbols`` in the given order, then ``<eos>``, ``<pad>``
    and, when ``add_unk``, ``<unk>``. ``decode`` joins words with single spaces.

    Args:
        symbols: The words of the vocabulary, in id order.
        add_unk: Map unknown words to ``<unk>``; otherwise encoding an unknown
            word raises :class:`DataError`.
    """

    _space_joined = True

    def __init__(self, symbols: Sequence[str], add_unk: bool = False) -> None:
        bad = [s for s in symbols if not s or s.split() != [s]]
        if bad:
            raise DataError(f"word vocabulary entries must be non-empty and without spaces: {bad[:5]}")
        super().__init__(symbols, "word", add_unk=add_unk)

    @classmethod
    def train(cls, texts: Iterable[str]) -> WordTokenizer:
        """Vocabulary = sorted set of whitespace-separated words of ``texts``."""
        words: set[str] = set()
        for text in texts:
            words.update(text.split())
        if not words:
            raise DataError("cannot build a word tokenizer from empty training texts")
        return cls(sorted(words), add_unk=True)

    def _kind(self) -> str:
        return "word"

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in text.split():
            i = self._index.get(word, self.unk_id)
            if i is None:
                raise DataError(f"word {word!r} is not in the vocabulary")
            ids.append(i)
        return ids
