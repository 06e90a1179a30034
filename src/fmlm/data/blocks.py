"""Fixed-length blocks of token ids (memory-mapped or in memory) and the bundle of train/validation blocks a run
trains on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmlm.data.phrases import PhrasesTask
from fmlm.data.tokenizers import Tokenizer


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
