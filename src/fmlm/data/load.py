"""The DataBundle a :class:`fmlm.config.RunConfig` asks for."""

from __future__ import annotations

from pathlib import Path

from fmlm.config import RunConfig
from fmlm.data.blocks import DataBundle
from fmlm.data.tokenizers import Tokenizer
from fmlm.runtime import default_cache_dir


def load_data(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> DataBundle:
    """Build the DataBundle for a config (tokenizer fixed when resuming or evaluating)."""
    from fmlm.data.dataset import build_data

    d = cfg.data
    phrases = dict(
        n=d.phrases_n, k=d.phrases_k, phrases_per_seq=d.phrases_per_seq, vocab_size=d.phrases_vocab or None, seed=d.seed
    )
    return build_data(
        dataset=d.dataset,
        tokenizer=d.tokenizer,
        seq_len=d.seq_len,
        cache_dir=Path(d.cache_dir) if d.cache_dir else default_cache_dir(),
        packing=d.packing,
        val_fraction=d.val_fraction,
        seed=d.seed,
        phrases=phrases if d.dataset == "phrases" else None,
        tokenizer_obj=tokenizer,
    )
