"""Tokenised, packed, cached training data.

:func:`build_data` turns a dataset name/path and a tokenizer spec into fixed-length
blocks of token ids for training and validation:

* ``wrap`` packing (LM1B-style): documents, each followed by EOS, are
  concatenated and cut into blocks of ``seq_len``; the incomplete last block is
  dropped.
* ``pad`` packing: one block per document. The document's ids followed by EOS are
  cut to ``seq_len`` (so a document that fills the block loses its EOS, which
  marks only true document ends) and padded with ``pad_id``.

Blocks are stored under ``cache_dir/tokens/<key>/`` as raw ``train.bin`` /
``val.bin`` arrays (uint16 when the vocabulary fits, else uint32) with a
``meta.json``, and opened as read-only memory maps. The key hashes everything that
changes the result (corpus identity, tokenizer spec and vocabulary, ``seq_len``,
packing, ``val_fraction``, ``seed``, format version), so a second call with the same
arguments neither reads the corpus nor tokenises it. Entries are built in a
temporary folder and renamed into place, so an interrupted build leaves nothing
that looks valid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fmlm.data.corpora import Corpus, corpus_identity, load_corpus
from fmlm.data.phrases import PhrasesTask
from fmlm.data.tokenizers import Tokenizer, build_tokenizer, parse_spec
from fmlm.data.tokenizers.base import _hash_hex
from fmlm.errors import DataError

__all__ = ["FORMAT_VERSION", "PACKINGS", "DataBundle", "TokenBlocks", "build_data"]

log = logging.getLogger(__name__)

#: Bump when the on-disk layout or packing rules change (invalidates caches).
FORMAT_VERSION = 1
PACKINGS = ("wrap", "pad")

#: Default sizes of the materialised phrases splits.
PHRASES_TRAIN = 50_000
PHRASES_VAL = 2_000

# Documents are tokenised in chunks this big: large enough for the HF backends'
# thread pool, small enough to keep memory flat on big corpora.
_CHUNK_CHARS = 4_000_000
_CHUNK_DOCS = 20_000
# Rows of the (rows, seq_len) gather done at once in pad packing.
_PAD_GATHER = 4_000_000


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id: uint16 below 65,536, else uint32."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


class TokenBlocks:
    """Fixed-length blocks of token ids backed by a numpy array or memory map.

    Args:
        data: ``(num_blocks, seq_len)`` array of ids (uint16/uint32 on disk).
        path: File the array maps, if any; lets the object pickle cheaply (data
            loader workers reopen the map instead of copying it).
    """

    def __init__(self, data: np.ndarray, path: Path | None = None) -> None:
        if data.ndim != 2:
            raise ValueError(f"token blocks must be 2-D, got shape {data.shape}")
        self.data = data
        self.path = path
        self.seq_len = int(data.shape[1])

    @classmethod
    def open(cls, path: Path, num_blocks: int, seq_len: int, dtype: np.dtype | str) -> TokenBlocks:
        """Memory-map ``path`` read-only as ``(num_blocks, seq_len)``."""
        data = np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=(num_blocks, seq_len))
        return cls(data, Path(path))

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def num_tokens(self) -> int:
        """Number of ids stored (padding included)."""
        return int(self.data.size)

    def batch(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Blocks ``indices`` as a ``(B, seq_len)`` int64 tensor on the CPU."""
        if isinstance(indices, torch.Tensor):
            index = indices.detach().to("cpu", torch.int64).numpy()
        else:
            index = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.data[index].astype(np.int64))

    def __getitem__(self, index: int) -> torch.Tensor:
        """Block ``index`` as a ``(seq_len,)`` int64 tensor."""
        return torch.from_numpy(np.asarray(self.data[index], dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        if self.path is not None:
            return {"path": self.path, "shape": self.data.shape, "dtype": self.data.dtype.str}
        return {"data": np.asarray(self.data)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "path" in state:
            num, seq_len = state["shape"]
            other = TokenBlocks.open(state["path"], num, seq_len, state["dtype"])
            self.data, self.path, self.seq_len = other.data, other.path, other.seq_len
        else:
            self.__init__(state["data"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"TokenBlocks(num_blocks={len(self)}, seq_len={self.seq_len}, dtype={self.data.dtype})"


@dataclass
class DataBundle:
    """Everything the trainer needs about the data.

    Attributes:
        train: Training blocks.
        val: Validation blocks (never overlapping the training documents).
        tokenizer: The tokenizer the ids belong to.
        task: The phrases task (for its exact checker), else ``None``.
        info: ``dataset``, ``corpus`` (identity), ``tokenizer``, ``vocab_size``,
            ``seq_len``, ``packing``, ``train_blocks``/``val_blocks``,
            ``train_tokens``/``val_tokens`` (ids that are not padding, EOS
            included), ``cache_path``, ``cache_hit`` and, for text corpora,
            ``train_docs``/``val_docs``, ``line_based`` and ``corpus_info`` (how
            the split was made, which files went where).
    """

    train: TokenBlocks
    val: TokenBlocks
    tokenizer: Tokenizer
    task: PhrasesTask | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ phrases
def _build_phrases(
    seq_len: int, seed: int, phrases: dict[str, Any] | None, tokenizer_obj: Tokenizer | None
) -> DataBundle:
    options = dict(phrases or {})
    num_train = int(options.pop("num_train", PHRASES_TRAIN))
    num_val = int(options.pop("num_val", PHRASES_VAL))
    try:
        task = PhrasesTask(**options)
    except TypeError as exc:
        raise DataError(f"bad phrases options {sorted(options)}: {exc}") from exc
    if seq_len != task.seq_len:
        raise DataError(
            f"seq_len must be {task.seq_len} for this phrases task (k={task.k} x phrases_per_seq="
            f"{task.phrases_per_seq}), got {seq_len}"
        )
    if tokenizer_obj is not None and tokenizer_obj.fingerprint != task.tokenizer.fingerprint:
        raise DataError("the given tokenizer does not match the phrases task's vocabulary")
    if num_train < 1 or num_val < 1:
        raise DataError("phrases num_train and num_val must be at least 1")
    dtype = dtype_for_vocab(task.tokenizer.vocab_size)
    # Distinct generator seeds for the two splits (and for different `seed`s).
    train = TokenBlocks(task.make_split(num_train, 2 * seed).astype(dtype))
    val = TokenBlocks(task.make_split(num_val, 2 * seed + 1).astype(dtype))
    info = {
        "dataset": "phrases",
        "corpus": f"phrases:{json.dumps(task.config, sort_keys=True)}",
        "phrases": task.config,
        "tokenizer": task.tokenizer.spec,
        "vocab_size": task.tokenizer.vocab_size,
        "seq_len": seq_len,
        "packing": "phrases",
        "seed": seed,
        "train_blocks": len(train),
        "val_blocks": len(val),
        "train_tokens": train.num_tokens,
        "val_tokens": val.num_tokens,
        "cache_path": None,
        "cache_hit": False,
    }
    return DataBundle(train=train, val=val, tokenizer=task.tokenizer, task=task, info=info)


# --------------------------------------------------------------- tokenising
def _chunks(docs: Sequence[str]) -> Iterator[Sequence[str]]:
    start = 0
    while start < len(docs):
        end, chars = start, 0
        while end < len(docs) and end - start < _CHUNK_DOCS and (chars < _CHUNK_CHARS or end == start):
            chars += len(docs[end])
            end += 1
        yield docs[start:end]
        start = end


def _num_chunks(docs: Sequence[str]) -> int:
    return sum(1 for _ in _chunks(docs)) if len(docs) > _CHUNK_DOCS else -1


def _with_eos(ids: np.ndarray, lengths: np.ndarray, eos_id: int) -> np.ndarray:
    """Insert ``eos_id`` after each document of a flat id array."""
    return np.insert(ids, np.cumsum(lengths), eos_id)


def _pad_rows(
    stream: np.ndarray, lengths: np.ndarray, seq_len: int, pad_id: int, dtype: np.dtype
) -> Iterator[np.ndarray]:
    """Padded blocks, one per document, from ``stream`` (documents each followed by EOS).

    ``lengths`` include the EOS. Yields ``(rows, seq_len)`` arrays in order.
    """
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    keep = np.minimum(lengths, seq_len)
    positions = np.arange(seq_len, dtype=np.int64)
    rows_at_once = max(1, _PAD_GATHER // seq_len)
    for lo in range(0, len(lengths), rows_at_once):
        hi = min(lo + rows_at_once, len(lengths))
        index = np.minimum(starts[lo:hi, None] + positions[None, :], len(stream) - 1)
        mask = positions[None, :] < keep[lo:hi, None]
        yield np.where(mask, stream[index], pad_id).astype(dtype)


def _encode_split(
    tokenizer: Tokenizer, docs: Sequence[str], seq_len: int, packing: str, dtype: np.dtype, out: Path, label: str
) -> dict[str, int]:
    """Tokenise and pack ``docs`` into the raw file ``out``; return its counts."""
    eos = tokenizer.eos_id
    total = 0  # ids in the wrap stream (documents + EOS), before cutting
    real = 0  # non-padding ids in the written blocks
    blocks = 0
    num_chunks = _num_chunks(docs)
    with (
        open(out, "wb") as handle,
        tqdm(
            total=num_chunks if num_chunks > 0 else None,
            desc=f"tokenizing {label}",
            unit="chunk",
            disable=num_chunks <= 1,
            leave=False,
        ) as bar,
    ):
        for chunk in _chunks(docs):
            ids, lengths = tokenizer.encode_flat(chunk)
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise DataError(f"tokenizer {tokenizer.spec} produced ids outside its vocabulary")
            stream = _with_eos(ids, lengths, eos)
            total += stream.size
            if packing == "wrap":
                handle.write(stream.astype(dtype).tobytes())
            else:
                with_eos = lengths + 1
                for rows in _pad_rows(stream, with_eos, seq_len, tokenizer.pad_id, dtype):
                    handle.write(rows.tobytes())
                real += int(np.minimum(with_eos, seq_len).sum())
                blocks += len(with_eos)
            bar.update(1)
    if packing == "wrap":
        blocks = total // seq_len
        real = blocks * seq_len
        # The stream was written whole; dropping the incomplete last block is a truncate.
        os.truncate(out, blocks * seq_len * dtype.itemsize)
    return {"blocks": blocks, "tokens": real, "stream_tokens": total, "docs": len(docs)}


# -------------------------------------------------------------------- cache
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:48] or "data"


def _key_fields(
    identity: str, tokenizer: Tokenizer, seq_len: int, packing: str, val_fraction: float, seed: int
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "corpus": identity,
        "tokenizer": tokenizer.spec,
        "vocab": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "seq_len": seq_len,
        "packing": packing,
        "val_fraction": val_fraction,
        "seed": seed,
    }


def _open_entry(entry: Path, key: dict[str, Any]) -> tuple[TokenBlocks, TokenBlocks, dict[str, Any]] | None:
    """Open a cache entry if it is complete and was built for exactly ``key``."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        dtype = np.dtype(meta["dtype"])
        seq_len = int(key["seq_len"])
        opened = []
        for split in ("train", "val"):
            num = int(meta[split]["blocks"])
            path = entry / f"{split}.bin"
            if num < 1 or path.stat().st_size != num * seq_len * dtype.itemsize:
                return None
            opened.append(TokenBlocks.open(path, num, seq_len, dtype))
        return opened[0], opened[1], meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_tokenizer_matches(spec: str, tokenizer: Tokenizer) -> None:
    """A tokenizer handed in (e.g. from a checkpoint) must be the configured kind."""
    want_kind, want_arg = parse_spec(spec)
    have_kind, have_arg = parse_spec(tokenizer.spec)
    same = want_kind == have_kind and (want_kind != "bpe" or want_arg == have_arg)
    if not same:
        raise DataError(f"the given tokenizer is {tokenizer.spec!r} but the configuration asks for {spec!r}")


class _LazyCorpus:
    """Loads the corpus on first call only, so cache hits never read the text."""

    def __init__(self, load: Callable[[], Corpus]) -> None:
        self._load = load
        self._corpus: Corpus | None = None

    def __call__(self) -> Corpus:
        if self._corpus is None:
            self._corpus = self._load()
        return self._corpus


def build_data(
    dataset: str,
    tokenizer: str,
    seq_len: int,
    cache_dir: Path,
    packing: str = "wrap",
    val_fraction: float = 0.05,
    seed: int = 0,
    phrases: dict[str, Any] | None = None,
    tokenizer_obj: Tokenizer | None = None,
    tokenizer_search_paths: Sequence[str | Path] = (),
) -> DataBundle:
    """Build (or reuse from the cache) training and validation token blocks.

    Args:
        dataset: ``"phrases"``, a dataset name, ``<name>:<path>`` or a local path
            (see :func:`fmlm.data.load_corpus`).
        tokenizer: Tokenizer spec (see :func:`fmlm.data.build_tokenizer`); ignored
            for ``phrases``, which has its own word vocabulary.
        seq_len: Block length in tokens.
        cache_dir: Root of the cache (tokenizers, token blocks, downloads).
        packing: ``"wrap"`` or ``"pad"``.
        val_fraction: Held-out share when the corpus has no native validation split.
        seed: Split seed (which documents are held out; the phrases samples).
        phrases: Options of :class:`PhrasesTask`, plus optional ``num_train`` /
            ``num_val`` (defaults 50,000 / 2,000).
        tokenizer_obj: Use this tokenizer (e.g. restored from a checkpoint)
            instead of building one; it must be of the configured kind.
        tokenizer_search_paths: Extra folders with pretrained tokenizer files.

    Raises:
        DataError: Bad arguments, unusable corpus or tokenizer, or a split with
            fewer tokens than one block.
    """
    if int(seq_len) != seq_len or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len}")
    seq_len = int(seq_len)
    if str(dataset).strip().lower() == "phrases":
        return _build_phrases(seq_len, int(seed), phrases, tokenizer_obj)
    if packing not in PACKINGS:
        raise DataError(f"unknown packing {packing!r}; expected one of {', '.join(PACKINGS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    cache_dir = Path(cache_dir)
    identity = corpus_identity(dataset)
    corpus = _LazyCorpus(lambda: load_corpus(dataset, cache_dir, val_fraction=val_fraction, seed=seed))

    if tokenizer_obj is not None:
        _check_tokenizer_matches(tokenizer, tokenizer_obj)
        tok = tokenizer_obj
    else:
        tok = build_tokenizer(
            tokenizer,
            # Trained vocabularies see the training split only.
            train_texts=lambda: corpus().train,
            cache_dir=cache_dir,
            search_paths=tokenizer_search_paths,
            cache_key=f"{identity}\0val_fraction={val_fraction}\0seed={seed}",
        )

    key = _key_fields(identity, tok, seq_len, packing, val_fraction, seed)
    digest = json.dumps(key, sort_keys=True)
    label = Path(str(dataset).split(":", 1)[-1]).name or str(dataset)
    name = f"{_slug(label)}-{_slug(tok.spec)}-L{seq_len}-{packing}-{_hash_hex(digest, 8)}"
    entry = cache_dir / "tokens" / name

    opened = _open_entry(entry, key)
    hit = opened is not None
    if opened is None:
        _build_entry(entry, key, corpus(), tok, seq_len, packing, str(dataset))
        opened = _open_entry(entry, key)
        if opened is None:
            raise DataError(f"token cache {entry} could not be written or read back")
    train, val, meta = opened
    info = {
        "dataset": str(dataset),
        "corpus": identity,
        "tokenizer": tok.spec,
        "vocab_size": tok.vocab_size,
        "seq_len": seq_len,
        "packing": packing,
        "val_fraction": val_fraction,
        "seed": seed,
        "train_blocks": len(train),
        "val_blocks": len(val),
        "train_tokens": int(meta["train"]["tokens"]),
        "val_tokens": int(meta["val"]["tokens"]),
        "train_docs": int(meta["train"]["docs"]),
        "val_docs": int(meta["val"]["docs"]),
        "line_based": bool(meta.get("line_based", False)),
        "corpus_info": meta.get("corpus_info", {}),
        "cache_path": str(entry),
        "cache_hit": hit,
    }
    return DataBundle(train=train, val=val, tokenizer=tok, task=None, info=info)


def _build_entry(
    entry: Path, key: dict[str, Any], corpus: Corpus, tok: Tokenizer, seq_len: int, packing: str, dataset: str
) -> None:
    """Tokenise ``corpus`` into a fresh cache entry at ``entry``."""
    dtype = dtype_for_vocab(tok.vocab_size)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        counts = {}
        for split, docs in (("train", corpus.train), ("val", corpus.val)):
            log.info("tokenizing %s split of %s (%d documents)", split, dataset, len(docs))
            out = tmp / f"{split}.bin"
            counts[split] = _encode_split(tok, docs, seq_len, packing, dtype, out, f"{dataset} {split}")
            if counts[split]["tokens"] < seq_len or counts[split]["blocks"] < 1:
                raise DataError(
                    f"the {split} split of {dataset} has {counts[split]['stream_tokens']} tokens, fewer than "
                    f"one block of seq_len={seq_len}; use a shorter seq_len or more data"
                )
        tok.save(tmp / "tokenizer")
        meta = {
            "key": key,
            "dtype": dtype.name,
            "train": counts["train"],
            "val": counts["val"],
            "line_based": corpus.line_based,
            "corpus_info": corpus.info,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        if entry.exists():
            # A stale or damaged entry under the same name: move it aside first
            # because a directory cannot be replaced while it is non-empty.
            trash = entry.with_name(f".old-{entry.name}-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(OSError):
                os.replace(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            # Another process installed the same entry meanwhile; keep theirs.
            if _open_entry(entry, key) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
