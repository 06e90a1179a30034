"""Data layer: corpora, tokenizers, the synthetic phrases task, packed token blocks.

The trainer calls :func:`build_data`; the rest is exposed for the CLI, evaluation
and tests.
"""

from fmlm.data.corpora import NAMED_CORPORA, Corpus, corpus_identity, load_corpus, strip_gutenberg
from fmlm.data.dataset import PACKINGS, DataBundle, TokenBlocks, build_data
from fmlm.data.phrases import PhrasesTask
from fmlm.data.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    WordTokenizer,
    build_tokenizer,
    load_tokenizer,
)

#: Every dataset name :func:`build_data` accepts (besides ``<name>:<path>`` and paths).
DATASETS: tuple[str, ...] = ("shakespeare", "phrases", *(n for n in NAMED_CORPORA if n != "shakespeare"))

__all__ = [
    "DATASETS",
    "PACKINGS",
    "CharTokenizer",
    "Corpus",
    "DataBundle",
    "HFTokenizer",
    "PhrasesTask",
    "TiktokenTokenizer",
    "TokenBlocks",
    "Tokenizer",
    "WordTokenizer",
    "build_data",
    "build_tokenizer",
    "corpus_identity",
    "load_corpus",
    "load_tokenizer",
    "strip_gutenberg",
]
