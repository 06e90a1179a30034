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

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fmlm.data.blocks import DataBundle, TokenBlocks, dtype_for_vocab
from fmlm.data.cache import FORMAT_VERSION, _build_entry, _key_fields, _open_entry, _slug
from fmlm.data.corpora import Corpus, corpus_identity, load_corpus
from fmlm.data.phrases import PhrasesTask
from fmlm.data.tokenizers import Tokenizer, build_tokenizer, parse_spec
from fmlm.data.tokenizers.base import _hash_hex
from fmlm.errors import DataError

__all__ = ["FORMAT_VERSION", "PACKINGS", "DataBundle", "TokenBlocks", "build_data"]


PACKINGS = ("wrap", "pad")

#: Default sizes of the materialised phrases splits.
PHRASES_TRAIN = 50_000
PHRASES_VAL = 2_000


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
