"""Atomic writes: the one place that does temp file + fsync + ``os.replace``.

A reader (or a run killed at any moment) sees either the old file or the new one,
never a half-written one. Every JSON file fmlm writes goes through :func:`write_json`;
every directory built in a temporary sibling (checkpoints, cache entries, tokenizers)
is moved into place by :func:`replace_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (a rename inside it) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_path(path: str | Path) -> Path:
    """A hidden, unique sibling of ``path`` for writing before the rename."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | Path, write: Callable[[Path], None], fsync: bool = True) -> Path:
    """Call ``write(tmp)`` to produce the new file, then move it over ``path`` in one step.

    ``write`` may create the temporary file however it likes (``save_file``, a backend's
    ``save``, ...). On any error the temporary file is removed and ``path`` is unchanged.
    """
    p = Path(path)
    tmp = temp_path(p)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(p.parent)
    return p


def write_text(path: str | Path, text: str, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json(path: str | Path, obj: Any, indent: int | None = 2, fsync: bool = True, **kw) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent, **kw) + "\n", fsync=fsync)


def replace_dir(tmp: str | Path, final: str | Path, keep_theirs: bool = False) -> bool:
    """Move the complete directory ``tmp`` to ``final`` in one rename.

    An existing ``final`` is first renamed aside (``.old-NAME-PID``, so a crash in between leaves
    a complete copy on disk) and deleted after the move. If the rename fails (e.g. another process
    installed ``final`` meanwhile) the previous copy is put back; with ``keep_theirs`` the result is
    then False and ``tmp`` is left for the caller to delete, otherwise the OSError propagates.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    try:
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError:
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)
        if not keep_theirs:
            raise
        return False
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)
    return True
