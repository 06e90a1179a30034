"""Loading a corpus by name or path: :func:`load_corpus` and the identity that keys its caches."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmlm.data.corpora.corpus import TEXT_EXTENSIONS, Corpus, _display, _finish, _nonblank
from fmlm.data.corpora.files import (
    _assign_roles,
    _check_supported,
    _is_hidden,
    _list_files,
    _read_records,
    _read_text,
    _rel,
    _supported,
)
from fmlm.data.corpora.shakespeare import _play_name, _shakespeare_plays, _shakespeare_root, _split_plays
from fmlm.data.corpora.splitting import (
    _hash_split,
    _split_lines,
    _split_tinystories,
    split_wikitext_articles,
    strip_gutenberg,
)
from fmlm.errors import DataError

#: Dataset names :func:`load_corpus` knows (``phrases`` is synthetic, see phrases.py).
NAMED_CORPORA = ("shakespeare", "lm1b", "openwebtext", "wikitext2", "wikitext103", "tinystories")


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
