"""Tokenizers: a small common interface over character, word, trained byte-level
BPE and pretrained (GPT-2, BERT) vocabularies.

Every tokenizer has an end-of-sequence id (``eos_id``), used to separate documents
when packing a corpus, and a padding id (``pad_id``) for padded packing. ``encode``
never adds special tokens (no ``[CLS]``/``[SEP]`` for BERT): for language modelling
sentences are separated by EOS during packing instead.

``decode`` skips padding and renders EOS as the tokenizer's own EOS text
(``<eos>`` for char/word/bpe, ``<|endoftext|>`` for GPT-2, ``[SEP]`` for BERT), so
document boundaries stay visible in samples. When ``pad_id == eos_id`` (GPT-2) a run
of consecutive EOS ids is rendered once, because the tail of a padded block is made
of them. Ids outside the vocabulary (e.g. a diffusion model's mask id) are rendered
as ``<?>``.

Specs accepted by :func:`build_tokenizer`:

* ``char``: the sorted set of characters of the training texts, plus ``<eos>``,
  ``<pad>``, ``<unk>``.
* ``word``: whitespace-separated words of the training texts, plus ``<eos>``,
  ``<pad>``, ``<unk>`` (:class:`WordTokenizer` can also be given an explicit word
  list, as the synthetic phrases task does).
* ``bpe:<size>``: a byte-level BPE trained on the training texts with Hugging Face
  ``tokenizers``; ``<eos>`` and ``<pad>`` are its first two ids.
* ``gpt2`` / ``gpt2:<dir>``: GPT-2's 50,257-token byte-level BPE.
* ``bert-base-uncased`` / ``bert-base-uncased:<dir>``: BERT's uncased WordPiece.
"""

from fmlm.data.tokenizers.base import EOS_TOKEN, PAD_TOKEN, TOKENIZER_ENV_VAR, UNK_TOKEN, UNKNOWN_ID_TEXT, Tokenizer
from fmlm.data.tokenizers.build import build_tokenizer, parse_spec
from fmlm.data.tokenizers.load import load_tokenizer
from fmlm.data.tokenizers.pretrained import HFTokenizer, TiktokenTokenizer
from fmlm.data.tokenizers.symbols import CharTokenizer, WordTokenizer

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TOKENIZER_ENV_VAR",
    "UNK_TOKEN",
    "UNKNOWN_ID_TEXT",
    "CharTokenizer",
    "HFTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "parse_spec",
]
