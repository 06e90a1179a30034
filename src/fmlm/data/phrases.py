"""The synthetic phrases task: a generalised "New York / San Diego" benchmark.

The data are ``n`` phrases of ``k`` tokens each; a sequence is ``phrases_per_seq``
phrases drawn independently and uniformly. No two phrases share a token at the
same position, so every position's marginal is uniform over ``n`` tokens and a
model that samples positions independently produces *mixtures* (``new diego``)
with probability ``1 - 1/n**(k-1)`` per phrase, while a model that captures the
joint distribution produces only valid phrases. The exact checker
(:meth:`PhrasesTask.check`) measures both failure modes: invalid blocks
(``valid_rate``) and mode collapse (``coverage``, the normalised entropy of the
generated phrases).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fmlm.data.tokenizers import WordTokenizer
from fmlm.errors import DataError

__all__ = ["PhrasesTask", "fake_words"]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_MAX_VOCAB = 100_000


def fake_words(count: int) -> list[str]:
    """``count`` distinct, pronounceable, deterministic fake words.

    Words are consonant-vowel syllables (``"kemo"``, ``"taribu"``): all
    two-syllable words in a fixed shuffled order first, then three-syllable ones.
    The list depends only on ``count`` (a prefix of a longer list).
    """
    if not 0 <= count <= _MAX_VOCAB:
        raise DataError(f"phrases vocabulary size must be at most {_MAX_VOCAB}, got {count}")
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words: list[str] = []
    length = 2
    while len(words) < count:
        combos = ["".join(p) for p in itertools.product(syllables, repeat=length)]
        # A fixed shuffle so that consecutive ids do not look alike.
        random.Random(f"fmlm-fake-words-{length}").shuffle(combos)
        words.extend(combos[: count - len(words)])
        length += 1
    return words


class PhrasesTask:
    """``n`` phrases of ``k`` words; sequences are ``phrases_per_seq`` random phrases.

    Args:
        n: Number of phrases (default 8).
        k: Tokens per phrase (default 2).
        vocab_size: Number of word tokens, specials excluded (default ``2 * n``,
            so each position uses only part of the vocabulary and a word can occur
            at several positions). Must be at least ``n``.
        phrases_per_seq: Phrases per sequence; ``seq_len = k * phrases_per_seq``.
        seed: Chooses the phrases (not the samples).
        words: Explicit phrases as strings (``["new york", "san diego"]``); then
            ``n``, ``k`` and the vocabulary come from them and ``vocab_size`` must
            not be given.

    Attributes:
        tokenizer: Word tokenizer over the task's words plus ``<eos>``, ``<pad>``.
        phrases: The ``n`` phrases as tuples of ``k`` token ids.
        seq_len: ``k * phrases_per_seq``.
    """

    def __init__(
        self,
        n: int | None = None,
        k: int | None = None,
        vocab_size: int | None = None,
        phrases_per_seq: int = 1,
        seed: int = 0,
        words: Sequence[str] | None = None,
    ) -> None:
        if phrases_per_seq < 1:
            raise DataError(f"phrases_per_seq must be at least 1, got {phrases_per_seq}")
        self.phrases_per_seq = int(phrases_per_seq)
        self.seed = int(seed)
        self.words = list(words) if words is not None else None
        if words is not None:
            vocabulary, phrases = self._from_words(words, n, k, vocab_size)
        else:
            vocabulary, phrases = self._random(8 if n is None else n, 2 if k is None else k, vocab_size)
        self.phrases: list[tuple[int, ...]] = phrases
        self.n = len(phrases)
        self.k = len(phrases[0])
        self.vocab_size = len(vocabulary)
        self.seq_len = self.k * self.phrases_per_seq
        self.tokenizer = WordTokenizer(vocabulary)
        self._table = torch.tensor(phrases, dtype=torch.long)
        # Position-0 tokens are distinct, so the first token of a block names the
        # only phrase it can be: checking is a lookup, not a search.
        self._by_first = np.full(self.vocab_size, -1, dtype=np.int64)
        for index, phrase in enumerate(phrases):
            self._by_first[phrase[0]] = index

    # ------------------------------------------------------------ construction
    def _random(self, n: int, k: int, vocab_size: int | None) -> tuple[list[str], list[tuple[int, ...]]]:
        if n < 1 or k < 1:
            raise DataError(f"phrases task needs n >= 1 and k >= 1, got n={n}, k={k}")
        size = 2 * n if vocab_size is None else int(vocab_size)
        if size < n:
            raise DataError(f"phrases vocab_size must be at least n={n} (distinct tokens per position), got {size}")
        rng = np.random.default_rng([self.seed, n, k, size])
        # Each position draws its own n distinct tokens; positions are independent,
        # so a token may serve at several positions.
        columns = [rng.permutation(size)[:n] for _ in range(k)]
        phrases = [tuple(int(col[i]) for col in columns) for i in range(n)]
        return fake_words(size), phrases

    @staticmethod
    def _from_words(
        words: Sequence[str], n: int | None, k: int | None, vocab_size: int | None
    ) -> tuple[list[str], list[tuple[int, ...]]]:
        split = [str(w).split() for w in words]
        if not split or not all(split):
            raise DataError("phrases task needs at least one non-empty phrase")
        length = len(split[0])
        if any(len(s) != length for s in split):
            raise DataError("all phrases must have the same number of words")
        if (n is not None and n != len(split)) or (k is not None and k != length):
            raise DataError(f"n/k do not match the given phrases ({len(split)} phrases of {length} words)")
        if vocab_size is not None:
            raise DataError("vocab_size cannot be set together with explicit phrases")
        for j in range(length):
            column = [s[j] for s in split]
            if len(set(column)) != len(column):
                raise DataError(f"two phrases share a word at position {j + 1}; words at a position must differ")
        vocabulary: list[str] = []
        for word in itertools.chain.from_iterable(split):
            if word not in vocabulary:
                vocabulary.append(word)
        index = {w: i for i, w in enumerate(vocabulary)}
        return vocabulary, [tuple(index[w] for w in s) for s in split]

    @classmethod
    def new_york(cls, phrases_per_seq: int = 1) -> PhrasesTask:
        """The classic two-phrase task: "new york" and "san diego"."""
        return cls(words=["new york", "san diego"], phrases_per_seq=phrases_per_seq)

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this task (e.g. for a checkpoint)."""
        if self.words is not None:
            return {"words": list(self.words), "phrases_per_seq": self.phrases_per_seq, "seed": self.seed}
        return {
            "n": self.n,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "phrases_per_seq": self.phrases_per_seq,
            "seed": self.seed,
        }

    def phrase_text(self, index: int) -> str:
        """The words of phrase ``index`` (``"new york"``)."""
        return self.tokenizer.decode(self.phrases[index])

    def __repr__(self) -> str:
        return (
            f"PhrasesTask(n={self.n}, k={self.k}, vocab_size={self.vocab_size}, phrases_per_seq={self.phrases_per_seq})"
        )

    # --------------------------------------------------------------- sampling
    def sample(self, num: int, generator: torch.Generator) -> torch.Tensor:
        """``num`` sequences of shape ``(num, seq_len)``; every aligned block of ``k``
        tokens is an independent, uniformly chosen phrase."""
        choice = torch.randint(self.n, (num, self.phrases_per_seq), generator=generator)
        return self._table[choice].reshape(num, self.seq_len)

    def make_split(self, num: int, seed: int) -> np.ndarray:
        """``num`` sequences from a generator seeded with ``seed`` (deterministic)."""
        generator = torch.Generator().manual_seed(int(seed))
        return self.sample(num, generator).numpy()

    @classmethod
    def from_config(cls, data_cfg: Any) -> PhrasesTask:
        """The task of a :class:`fmlm.config.DataConfig` (``phrases_n``, ``phrases_k``, ...)."""
        d = data_cfg
        return cls(
            n=d.phrases_n,
            k=d.phrases_k,
            phrases_per_seq=d.phrases_per_seq,
            vocab_size=d.phrases_vocab or None,
            seed=d.seed,
        )

    # --------------------------------------------------------------- labels
    def labels(self, samples: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Phrase family (index in ``phrases``) of each sample's first phrase, −1 when invalid.

        The derived label of the task's sequences, for training a classifier
        (``fmlm train phrases method=classifier``) and for measuring how often guided
        samples start with a chosen phrase. ``samples``: (num, L) ids, L ≥ k.
        """
        x = torch.as_tensor(samples, dtype=torch.long)
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[1] < self.k:
            raise ValueError(f"samples must be (num, L) with L >= {self.k}, got shape {tuple(x.shape)}")
        first = x[:, : self.k]  # (num, k)
        match = (first[:, None, :] == self._table[None]).all(-1)  # (num, n): at most one true per row
        return torch.where(match.any(-1), match.long().argmax(-1), torch.full_like(first[:, 0], -1))

    # --------------------------------------------------------------- checking
    def check(self, samples: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """Exact quality of generated sequences.

        Args:
            samples: ``(num, L)`` token ids with ``L`` a multiple of ``k`` (a 1-D
                array is one sample). Any id that is not a phrase token (specials,
                a mask id, out-of-range values) makes its block invalid.

        Returns:
            ``valid_rate``: fraction of samples whose every aligned block of ``k``
            is one of the phrases; ``block_valid_rate``: the same per block;
            ``coverage``: entropy of the phrases among all valid blocks divided by
            ``log n`` (1 = uniform, 0 = a single phrase or nothing valid; 1 when
            ``n == 1`` and something is valid); ``num_samples``; ``phrase_counts``:
            how many valid blocks are each phrase.
        """
        if isinstance(samples, torch.Tensor):
            samples = samples.detach().cpu().numpy()
        x = np.asarray(samples)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise ValueError(f"samples must be 1-D or 2-D, got shape {x.shape}")
        num, length = x.shape
        if length % self.k:
            raise ValueError(f"sample length {length} is not a multiple of the phrase length {self.k}")
        x = x.astype(np.int64, copy=False)
        blocks = x.reshape(num, length // self.k, self.k)
        first = blocks[..., 0]
        in_vocab = (first >= 0) & (first < self.vocab_size)
        candidate = np.where(in_vocab, self._by_first[np.where(in_vocab, first, 0)], -1)
        expected = self._table.numpy()[np.maximum(candidate, 0)]
        valid = (candidate >= 0) & (blocks == expected).all(axis=-1)
        counts = np.bincount(candidate[valid], minlength=self.n)
        total = int(counts.sum())
        if total == 0:
            coverage = 0.0
        elif self.n == 1:
            coverage = 1.0
        else:
            p = counts[counts > 0] / total
            coverage = min(1.0, max(0.0, float(-(p * np.log(p)).sum() / math.log(self.n))))  # no -0.0
        return {
            "valid_rate": float(valid.all(axis=1).mean()) if num else 0.0,
            "block_valid_rate": float(valid.mean()) if valid.size else 0.0,
            "coverage": coverage,
            "num_samples": int(num),
            "phrase_counts": counts.astype(int).tolist(),
        }
