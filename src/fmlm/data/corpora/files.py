"""Reading corpus files (.txt, .jsonl, .parquet) and finding a folder's train/validation files by their names."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from fmlm.data.corpora.corpus import TEXT_EXTENSIONS
from fmlm.errors import DataError

# File roles in pre-split folders, matched on whole words of the relative path.
_ROLE_PATTERNS = {
    "val": re.compile(r"(?<![a-z])(valid|validation|val|dev|heldout|held[-_ ]out)(?![a-z])"),
    "test": re.compile(r"(?<![a-z])test(?![a-z])"),
    "train": re.compile(r"(?<![a-z])(train|training)(?![a-z])"),
}


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
