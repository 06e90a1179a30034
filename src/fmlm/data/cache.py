"""The token cache: an entry per (corpus, tokenizer, packing, ...) key under ``cache_dir/tokens/``, built in a
temporary folder and renamed into place."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fmlm.data.blocks import TokenBlocks, dtype_for_vocab
from fmlm.data.corpora import Corpus
from fmlm.data.packing import _encode_split
from fmlm.data.tokenizers import Tokenizer
from fmlm.errors import DataError
from fmlm.io import replace_dir

#: Bump when the on-disk layout or packing rules change (invalidates caches).
FORMAT_VERSION = 1

log = logging.getLogger("fmlm.data.dataset")  # the name it had before the token cache had its own module


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
        try:  # a stale or damaged entry under the same name is replaced
            replace_dir(tmp, entry)
        except OSError:
            # Another process installed the same entry meanwhile; keep theirs.
            if _open_entry(entry, key) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
