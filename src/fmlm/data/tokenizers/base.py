"""The :class:`Tokenizer` interface every tokenizer implements, its special tokens and shared helpers."""

from __future__ import annotations

import abc
import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmlm.io import write_text

#: Environment variable naming a folder with one sub-folder per pretrained tokenizer
#: (``$FMLM_TOKENIZER_DIR/gpt2/``, ``$FMLM_TOKENIZER_DIR/bert-base-uncased/``).
TOKENIZER_ENV_VAR = "FMLM_TOKENIZER_DIR"

EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
#: How ids outside the vocabulary are rendered by ``decode``.
UNKNOWN_ID_TEXT = "<?>"

_SAVE_FORMAT = 1
_META = "meta.json"

_GPT2_VOCAB_SIZE = 50257
_GPT2_EOS = "<|endoftext|>"
_BPE_MIN_SIZE = 256 + 2  # every byte plus <eos> and <pad>

# HF tokenizers keeps per-token offsets and strings for every encoding, so a
# single multi-megabyte string costs a lot of memory and runs on one thread.
# Long texts are therefore encoded in pieces cut where the pre-tokenizers of
# GPT-2/BPE/BERT would split anyway (see ``_split_long_text``).
_LONG_TEXT = 200_000
_PIECE = 100_000
# A newline preceded and followed by a non-space character is always its own
# pre-token for GPT-2-style regexes and a word boundary for BERT, so cutting right
# after it leaves the token ids unchanged.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _hash_hex(data: str | bytes, size: int = 16) -> str:
    """Stable short hex digest (never Python's salted ``hash``)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.blake2b(data, digest_size=size).hexdigest()


def _as_int_list(ids: Any) -> list[int]:
    """Accept a list, numpy array or torch tensor of ids and return plain ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _split_long_text(text: str) -> list[str]:
    """Cut a long text into ~``_PIECE``-character pieces at token-neutral newlines."""
    if len(text) <= _LONG_TEXT:
        return [text]
    pieces: list[str] = []
    start = 0
    while len(text) - start > _PIECE:
        match = _SAFE_CUT.search(text, start + _PIECE)
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces


class Tokenizer(abc.ABC):
    """Common interface of all tokenizers.

    Attributes:
        spec: The spec it was built from, normalised (``"char"``, ``"bpe:4096"``,
            ``"gpt2"``, ``"bert-base-uncased"``, ``"word"``); a ``gpt2:<dir>`` spec
            becomes ``"gpt2"`` because the folder is a location, not an identity.
        vocab_size: Number of ids, specials included.
        eos_id: End-of-sequence id, appended after every document when packing.
        pad_id: Padding id for padded packing (may equal ``eos_id``).
    """

    spec: str
    vocab_size: int
    eos_id: int
    pad_id: int
    #: Text ``decode`` writes for EOS.
    eos_text: str = EOS_TOKEN
    #: Whether decoded pieces are joined with spaces (word-level vocabularies).
    _space_joined: bool = False
    _fingerprint: str | None = None

    # ----------------------------------------------------------------- encode
    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (backends override this with a faster path)."""
        return [self.encode(t) for t in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode many texts into one flat array.

        Returns:
            ``(ids, lengths)``: the concatenated ids (int64) and the number of ids of
            each text, so that text ``i`` is ``ids[sum(lengths[:i]):][:lengths[i]]``.
        """
        encoded = self.encode_batch(texts)
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
        return ids, lengths

    # ----------------------------------------------------------------- decode
    @abc.abstractmethod
    def _decode_plain(self, ids: list[int]) -> str:
        """Decode in-vocabulary ids that contain neither EOS nor padding."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: padding skipped, EOS rendered as :attr:`eos_text`.

        Args:
            ids: A list, numpy array or 1-D torch tensor of ids.
        """
        pieces: list[str] = []
        segment: list[int] = []
        previous_eos = False
        collapse_eos = self.pad_id == self.eos_id

        def flush() -> None:
            if segment:
                pieces.append(self._decode_plain(segment))
                segment.clear()

        for i in _as_int_list(ids):
            if i == self.eos_id:
                # With pad == eos the padded tail is a run of EOS: show it once.
                if not (collapse_eos and previous_eos):
                    flush()
                    pieces.append(self.eos_text)
                previous_eos = True
                continue
            previous_eos = False
            if i == self.pad_id:
                continue
            if not 0 <= i < self.vocab_size:
                flush()
                pieces.append(UNKNOWN_ID_TEXT)
                continue
            segment.append(i)
        flush()
        if self._space_joined:
            return " ".join(p for p in pieces if p)
        return "".join(pieces)

    # ------------------------------------------------------------ persistence
    @property
    def fingerprint(self) -> str:
        """Stable hash of the full vocabulary and rules (part of cache keys)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    @abc.abstractmethod
    def _compute_fingerprint(self) -> str:
        """Hash identifying the vocabulary, computed once."""

    @abc.abstractmethod
    def _kind(self) -> str:
        """Type tag stored in ``meta.json`` for :func:`load_tokenizer`."""

    @abc.abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write backend files into ``directory``; return extra meta fields."""

    def save(self, directory: str | Path) -> None:
        """Write everything needed to rebuild this tokenizer into ``directory``.

        The folder gets ``meta.json`` plus ``vocab.json`` (char/word) or
        ``tokenizer.json`` (Hugging Face backends); :func:`load_tokenizer` is the
        inverse. ``meta.json`` is written last so a half-written folder is
        detected as corrupt rather than loaded.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extra = self._save_files(directory)
        meta = {
            "format": _SAVE_FORMAT,
            "kind": self._kind(),
            "spec": self.spec,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "eos_text": self.eos_text,
            "fingerprint": self.fingerprint,
            **extra,
        }
        write_text(directory / _META, json.dumps(meta, indent=2))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"
