"""Wrappers of library tokenizers: Hugging Face ``tokenizers`` (trained BPE, GPT-2, BERT) and tiktoken's GPT-2."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fmlm.data.tokenizers.base import _GPT2_EOS, Tokenizer, _hash_hex, _split_long_text
from fmlm.io import write_atomic


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
