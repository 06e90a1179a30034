"""Tokenising documents in chunks and packing them into blocks: ``wrap`` (documents and EOS cut into blocks) or
``pad`` (one block per document)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fmlm.data.tokenizers import Tokenizer
from fmlm.errors import DataError

# Documents are tokenised in chunks this big: large enough for the HF backends'
# thread pool, small enough to keep memory flat on big corpora.
_CHUNK_CHARS = 4_000_000


_CHUNK_DOCS = 20_000


# Rows of the (rows, seq_len) gather done at once in pad packing.
_PAD_GATHER = 4_000_000


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
