"""Building a tokenizer from a spec: finding pretrained files, training a BPE, atomic saves."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from fmlm.data.tokenizers.base import (
    _BPE_MIN_SIZE,
    _GPT2_EOS,
    _GPT2_VOCAB_SIZE,
    _META,
    _SAVE_FORMAT,
    EOS_TOKEN,
    PAD_TOKEN,
    TOKENIZER_ENV_VAR,
    Tokenizer,
    _hash_hex,
    _split_long_text,
)
from fmlm.data.tokenizers.load import load_tokenizer
from fmlm.data.tokenizers.pretrained import HFTokenizer, TiktokenTokenizer
from fmlm.data.tokenizers.symbols import CharTokenizer, WordTokenizer
from fmlm.errors import DataError
from fmlm.io import replace_dir

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
    if not replace_dir(tmp, entry, keep_theirs=True):
        # Another process won the race; its copy is equivalent.
        shutil.rmtree(tmp, ignore_errors=True)
