"""Tokenizers: a small common interface over character, word, trained byte-level
BPE and pretrained (GPT-2, BERT) vocabularies.

Every tokenizer has an end-of-sequence id (``eos_id``), used to separate documents
when packing a corpus, and a padding id (``pad_id``) for padded packing. ``encode``
never adds special tokens (no ``[CLS]``/``[SEP]`` for BERT): for language modelling
sentences are separated by EOS during packing instead.

``decode`` skips padding and renders EOS as the tokenizer's own EOS text
(``<eos>`` for char/word/bpe, ``<|endoftext|>`` for GPT-2, ``[SEP]`` for BERT), so
document boundaries stay visible in samples. When ``pad_id == eos_id`` (GPT-2) a run
of consecutive EOS ids is rendered once, because the tail of a padded block is made
of them. Ids outside the vocabulary (e.g. a diffusion model's mask id) are rendered
as ``<?>``.

Specs accepted by :func:`build_tokenizer`:

* ``char``: the sorted set of characters of the training texts, plus ``<eos>``,
  ``<pad>``, ``<unk>``.
* ``word``: whitespace-separated words of the training texts, plus ``<eos>``,
  ``<pad>``, ``<unk>`` (:class:`WordTokenizer` can also be given an explicit word
  list, as the synthetic phrases task does).
* ``bpe:<size>``: a byte-level BPE trained on the training texts with Hugging Face
  ``tokenizers``; ``<eos>`` and ``<pad>`` are its first two ids.
* ``gpt2`` / ``gpt2:<dir>``: GPT-2's 50,257-token byte-level BPE.
* ``bert-base-uncased`` / ``bert-base-uncased:<dir>``: BERT's uncased WordPiece.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmlm.errors import DataError
from fmlm.io import write_atomic, write_text

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TOKENIZER_ENV_VAR",
    "UNK_TOKEN",
    "CharTokenizer",
    "HFTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "build_tokenizer",
    "load_tokenizer",
]

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


# --------------------------------------------------------------------- symbols
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


# ------------------------------------------------------------ Hugging Face
class HFTokenizer(Tokenizer):
    """Wrapper around a Hugging Face ``tokenizers.Tokenizer``.

    Args:
        backend: The HF tokenizer; padding and truncation are switched off and
            special tokens in the input text are treated as plain text.
        spec: Normalised spec.
        eos_id: EOS id in the backend vocabulary.
        pad_id: Padding id.
        eos_text: How ``decode`` renders EOS.
        space_joined: Join decoded pieces with spaces (WordPiece).
    """

    def __init__(
        self,
        backend: Any,
        spec: str,
        eos_id: int,
        pad_id: int,
        eos_text: str,
        space_joined: bool = False,
    ) -> None:
        # A tokenizer.json from the hub may carry padding/truncation settings
        # (BERT's pads to 128); packing does its own, so disable them.
        backend.no_padding()
        backend.no_truncation()
        # Corpus text that happens to contain "<eos>" or "[SEP]" is just text
        # (the switch exists from tokenizers 0.16 on).
        with contextlib.suppress(AttributeError):
            backend.encode_special_tokens = True
        self.backend = backend
        self.spec = spec
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.eos_text = eos_text
        self._space_joined = space_joined

    def _kind(self) -> str:
        return "hf"

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        pieces: list[str] = []
        counts: list[int] = []
        for text in texts:
            split = _split_long_text(text)
            pieces.extend(split)
            counts.append(len(split))
        fast = getattr(self.backend, "encode_batch_fast", None)
        if fast is not None:
            encodings = fast(pieces, add_special_tokens=False)
        else:
            encodings = self.backend.encode_batch(pieces, add_special_tokens=False)
        out: list[list[int]] = []
        position = 0
        for count in counts:
            ids: list[int] = []
            for encoding in encodings[position : position + count]:
                ids.extend(encoding.ids)
            out.append(ids)
            position += count
        return out

    def _decode_plain(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def _compute_fingerprint(self) -> str:
        return _hash_hex(self.backend.to_str())

    def _save_files(self, directory: Path) -> dict[str, Any]:
        write_atomic(directory / "tokenizer.json", lambda tmp: self.backend.save(str(tmp)))
        return {"space_joined": self._space_joined}


class TiktokenTokenizer(Tokenizer):
    """GPT-2 through ``tiktoken`` (used when the HF files are not at hand).

    Args:
        encoding: A ``tiktoken.Encoding`` (``tiktoken.get_encoding("gpt2")``).
        spec: Normalised spec (``"gpt2"``).
    """

    def __init__(self, encoding: Any, spec: str = "gpt2") -> None:
        self.encoding = encoding
        self.spec = spec
        self.vocab_size = int(encoding.n_vocab)
        self.eos_id = int(encoding.eot_token)
        self.pad_id = self.eos_id
        self.eos_text = _GPT2_EOS

    def _kind(self) -> str:
        return "tiktoken"

    def encode(self, text: str) -> list[int]:
        return list(self.encoding.encode_ordinary(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.encoding.encode_ordinary_batch(list(texts))]

    def _decode_plain(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def _compute_fingerprint(self) -> str:
        return _hash_hex(f"tiktoken:{self.encoding.name}:{self.vocab_size}")

    def _save_files(self, directory: Path) -> dict[str, Any]:
        # tiktoken keeps its own cache of the ranks; the name is enough to reload.
        return {"encoding": self.encoding.name}


# ------------------------------------------------------------------ loading
def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Rebuild a tokenizer written by :meth:`Tokenizer.save`.

    Raises:
        DataError: The folder or its files are missing, unreadable or inconsistent.
    """
    directory = Path(directory)
    meta_path = directory / _META
    if not meta_path.is_file():
        raise DataError(f"no tokenizer in {directory} (missing {_META})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
        if meta.get("format") != _SAVE_FORMAT:
            raise DataError(f"tokenizer in {directory} has format {meta.get('format')!r}, expected {_SAVE_FORMAT}")
        tokenizer: Tokenizer
        if kind in ("char", "word"):
            vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
            if kind == "char":
                tokenizer = CharTokenizer(vocab["symbols"])
            else:
                tokenizer = WordTokenizer(vocab["symbols"], add_unk=bool(vocab["add_unk"]))
            tokenizer.spec = meta["spec"]
        elif kind == "hf":
            from tokenizers import Tokenizer as _HF

            backend = _HF.from_file(str(directory / "tokenizer.json"))
            tokenizer = HFTokenizer(
                backend,
                spec=meta["spec"],
                eos_id=meta["eos_id"],
                pad_id=meta["pad_id"],
                eos_text=meta["eos_text"],
                space_joined=bool(meta.get("space_joined", False)),
            )
        elif kind == "tiktoken":
            try:
                import tiktoken
            except ImportError as exc:
                raise DataError(
                    f"tokenizer in {directory} needs the 'tiktoken' package (pip install tiktoken)"
                ) from exc
            tokenizer = TiktokenTokenizer(tiktoken.get_encoding(meta["encoding"]), spec=meta["spec"])
        else:
            raise DataError(f"tokenizer in {directory} has unknown kind {kind!r}")
    except DataError:
        raise
    except Exception as exc:
        # Missing files, bad JSON, missing keys, and HF's plain Exception for a
        # malformed tokenizer.json all mean the same thing to the user.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"corrupt tokenizer in {directory}: {first}") from exc
    for field in ("vocab_size", "eos_id", "pad_id"):
        if getattr(tokenizer, field) != meta.get(field):
            raise DataError(
                f"corrupt tokenizer in {directory}: {field} is {getattr(tokenizer, field)}, "
                f"meta.json says {meta.get(field)}"
            )
    saved = meta.get("fingerprint")
    if isinstance(saved, str):
        if kind in ("char", "word") and saved != tokenizer.fingerprint:
            raise DataError(f"corrupt tokenizer in {directory}: vocabulary does not match meta.json")
        # HF's serialisation may change between library versions; the saved
        # fingerprint names this vocabulary, so cache keys stay stable.
        tokenizer._fingerprint = saved
    return tokenizer


# ----------------------------------------------------------------- building
_PRETRAINED = ("gpt2", "bert-base-uncased")
_SPEC_HELP = "char, word, bpe:<size>, gpt2[:<dir>], bert-base-uncased[:<dir>]"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split a tokenizer spec into ``(kind, argument)``.

    ``"bpe:4096"`` -> ``("bpe", "4096")``; ``"gpt2:/dir"`` -> ``("gpt2", "/dir")``;
    ``"char"`` -> ``("char", None)``.
    """
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    return kind.strip().lower(), (arg.strip() if sep else None)


def _from_hub(name: str) -> Any:
    """Load a tokenizer from the Hugging Face hub (a seam the tests replace)."""
    from tokenizers import Tokenizer as _HF

    return _HF.from_pretrained(name)


def _candidate_dirs(name: str, explicit: str | None, search_paths: Sequence[str | Path]) -> list[tuple[Path, bool]]:
    """Folders that may hold ``name``'s files, with whether the folder is name-specific.

    Only name-specific folders may supply a generic ``tokenizer.json``: a bare
    search path could hold another tokenizer's ``tokenizer.json``.
    """
    if explicit is not None:
        return [(Path(explicit).expanduser(), True)]
    found: list[tuple[Path, bool]] = []
    env = os.environ.get(TOKENIZER_ENV_VAR)
    if env:
        found.append((Path(env).expanduser() / name, True))
    for path in search_paths:
        found.append((Path(path).expanduser() / name, True))
        found.append((Path(path).expanduser(), False))
    return found


def _load_gpt2_files(directory: Path, generic_ok: bool) -> Any | None:
    """HF backend from ``encoder.json`` + ``vocab.bpe`` (or ``tokenizer.json``)."""
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers

    encoder, merges = directory / "encoder.json", directory / "vocab.bpe"
    if encoder.is_file() and merges.is_file():
        backend = _HF(models.BPE.from_file(str(encoder), str(merges)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return backend
    if generic_ok and (directory / "tokenizer.json").is_file():
        return _HF.from_file(str(directory / "tokenizer.json"))
    return None


def _load_bert_files(directory: Path, generic_ok: bool) -> Any | None:
    """HF backend from BERT's ``vocab.txt`` (or ``tokenizer.json``)."""
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    vocab = directory / "vocab.txt"
    if vocab.is_file():
        backend = _HF(models.WordPiece.from_file(str(vocab), unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        return backend
    if generic_ok and (directory / "tokenizer.json").is_file():
        return _HF.from_file(str(directory / "tokenizer.json"))
    return None


def _wrap_gpt2(backend: Any, where: str) -> HFTokenizer:
    eos = backend.token_to_id(_GPT2_EOS)
    if backend.get_vocab_size() != _GPT2_VOCAB_SIZE or eos != _GPT2_VOCAB_SIZE - 1:
        raise DataError(f"{where} does not hold the GPT-2 tokenizer (50,257 tokens, {_GPT2_EOS} = 50256)")
    return HFTokenizer(backend, "gpt2", eos_id=eos, pad_id=eos, eos_text=_GPT2_EOS)


def _wrap_bert(backend: Any, where: str) -> HFTokenizer:
    sep, pad = backend.token_to_id("[SEP]"), backend.token_to_id("[PAD]")
    if sep is None or pad is None:
        raise DataError(f"{where} does not hold a BERT WordPiece vocabulary ([SEP]/[PAD] missing)")
    return HFTokenizer(backend, "bert-base-uncased", eos_id=sep, pad_id=pad, eos_text="[SEP]", space_joined=True)


def _build_pretrained(kind: str, explicit: str | None, search_paths: Sequence[str | Path]) -> Tokenizer:
    loader = _load_gpt2_files if kind == "gpt2" else _load_bert_files
    wrap = _wrap_gpt2 if kind == "gpt2" else _wrap_bert
    wanted = "encoder.json + vocab.bpe" if kind == "gpt2" else "vocab.txt"
    for directory, generic_ok in _candidate_dirs(kind, explicit, search_paths):
        if not directory.is_dir():
            continue
        try:
            backend = loader(directory, generic_ok)
        except Exception as exc:
            raise DataError(f"cannot read the {kind} tokenizer files in {directory}: {exc}") from exc
        if backend is not None:
            return wrap(backend, str(directory))
    if explicit is not None:
        raise DataError(f"no {kind} tokenizer files ({wanted} or tokenizer.json) in {explicit}")
    if kind == "gpt2":
        try:
            import tiktoken
        except ImportError:
            tiktoken = None
        if tiktoken is not None:
            try:
                return TiktokenTokenizer(tiktoken.get_encoding("gpt2"))
            except Exception:
                pass
    try:
        backend = _from_hub(kind)
    except Exception as exc:
        raise DataError(
            f"tokenizer {kind!r} not found locally and the Hugging Face hub is unreachable; "
            f"put {wanted} in ${TOKENIZER_ENV_VAR}/{kind}/ or use the spec '{kind}:/path/to/dir'"
        ) from exc
    return wrap(backend, f"the hub's {kind!r}")


def _train_bpe(size: int, texts: Iterable[str]) -> HFTokenizer:
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = _HF(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        # All 256 bytes up front so that any text can be encoded without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def pieces() -> Iterable[str]:
        for text in texts:
            yield from _split_long_text(text)

    backend.train_from_iterator(pieces(), trainer)
    # The trainer puts the special tokens first, in order.
    eos_id, pad_id = backend.token_to_id(EOS_TOKEN), backend.token_to_id(PAD_TOKEN)
    if eos_id is None or pad_id is None:
        raise DataError("BPE training failed to add the <eos>/<pad> tokens")
    return HFTokenizer(backend, f"bpe:{size}", eos_id=eos_id, pad_id=pad_id, eos_text=EOS_TOKEN)


def build_tokenizer(
    spec: str,
    train_texts: Callable[[], Iterable[str]] | None = None,
    cache_dir: Path | None = None,
    search_paths: Sequence[str | Path] = (),
    cache_key: str | None = None,
) -> Tokenizer:
    """Build (or load from cache) the tokenizer named by ``spec``.

    Args:
        spec: ``char``, ``word``, ``bpe:<size>``, ``gpt2[:<dir>]`` or
            ``bert-base-uncased[:<dir>]``.
        train_texts: Called (at most once, and only when no cached copy exists)
            to get the training texts of trained vocabularies (char/word/bpe).
        cache_dir: With ``cache_key``, trained tokenizers are saved under
            ``cache_dir/tokenizers/`` and reused.
        search_paths: Extra folders holding pretrained tokenizer files, either
            directly or in a ``gpt2/`` / ``bert-base-uncased/`` sub-folder.
        cache_key: Identity of the training texts (corpus, split); the cache entry
            is keyed by a hash of it and the spec.

    Raises:
        DataError: Unknown spec, bad BPE size, missing training texts or files.
    """
    kind, arg = parse_spec(spec)
    if kind in _PRETRAINED:
        return _build_pretrained(kind, arg or None, search_paths)
    if kind == "bpe":
        try:
            size = int(arg or "")
        except ValueError:
            raise DataError(f"bad tokenizer spec {spec!r}: expected bpe:<vocab size>, e.g. bpe:4096") from None
        if size < _BPE_MIN_SIZE:
            raise DataError(
                f"bpe vocabulary size must be at least {_BPE_MIN_SIZE} (256 bytes + 2 specials), got {size}"
            )
        normalized = f"bpe:{size}"
    elif kind in ("char", "word") and arg is None:
        normalized = kind
    else:
        raise DataError(f"unknown tokenizer {spec!r}; expected one of {_SPEC_HELP}")

    entry: Path | None = None
    if cache_dir is not None and cache_key is not None:
        digest = _hash_hex(f"{cache_key}\0{normalized}\0v{_SAVE_FORMAT}", 10)
        entry = Path(cache_dir) / "tokenizers" / f"{normalized.replace(':', '-')}-{digest}"
        if (entry / _META).is_file():
            try:
                return load_tokenizer(entry)
            except DataError:
                pass  # a damaged cache entry is simply rebuilt below
    if train_texts is None:
        raise DataError(f"tokenizer {normalized!r} is trained on a corpus, but no training texts were given")

    tokenizer: Tokenizer
    if normalized == "char":
        tokenizer = CharTokenizer.train(train_texts())
    elif normalized == "word":
        tokenizer = WordTokenizer.train(train_texts())
    else:
        tokenizer = _train_bpe(size, train_texts())
    if entry is not None:
        _save_atomic_dir(tokenizer, entry)
    return tokenizer


def _save_atomic_dir(tokenizer: Tokenizer, entry: Path) -> None:
    """Save into a temporary sibling folder, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".tmp-{entry.name}-{uuid.uuid4().hex}")
    tokenizer.save(tmp)
    if entry.exists():
        shutil.rmtree(entry, ignore_errors=True)
    try:
        os.replace(tmp, entry)
    except OSError:
        # Another process won the race; its copy is equivalent.
        shutil.rmtree(tmp, ignore_errors=True)
