"""Loading a tokenizer saved with a checkpoint or a data cache (any of the kinds, by its meta.json)."""

from __future__ import annotations

import json
from pathlib import Path

from fmlm.data.tokenizers.base import _META, _SAVE_FORMAT, Tokenizer
from fmlm.data.tokenizers.pretrained import HFTokenizer, TiktokenTokenizer
from fmlm.data.tokenizers.symbols import CharTokenizer, WordTokenizer
from fmlm.errors import DataError


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
