"""A run directory's checkpoints: listing them, choosing the newest valid one, resolving a path, removing stale
temporaries and old checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

from fmlm.checkpoint.layout import _STEP, _TEMP, MANIFEST, verify
from fmlm.errors import CheckpointError
from fmlm.io import write_text


def step_of(path: str | Path) -> int | None:
    """The step number of a ``step_XXXXXXXX`` checkpoint directory (None for other names)."""
    m = _STEP.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first by step number (complete or not)."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    found = [p for p in ck.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: (step_of(p), p.name))


_VERIFIED: set[tuple] = set()  # checkpoints whose deep check passed (this process), with their files' stats


def is_valid(path: Path, deep: bool = True) -> bool:
    """Whether ``path`` passes :func:`verify`; a deep pass is remembered while no file of the checkpoint
    changes size or modification time (so pruning hashes each checkpoint once)."""
    try:
        key = (str(path.resolve()),) + tuple(
            (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))
            if p.is_file()
        )
    except OSError:
        return False
    if key in _VERIFIED:
        return True
    try:
        verify(path, deep=deep)
    except CheckpointError:
        return False
    if deep:
        _VERIFIED.add(key)
    return True


def newest_valid(run_dir: str | Path, deep: bool = True) -> tuple[Path | None, list[str]]:
    """(newest valid checkpoint of a run or None, why each newer one was skipped)."""
    skipped: list[str] = []
    for p in reversed(list_checkpoints(run_dir)):
        try:
            verify(p, deep=deep)
            return p, skipped
        except CheckpointError as e:
            skipped.append(str(e))
    return None, skipped


def latest_checkpoint(run_dir: str | Path, deep: bool = False) -> Path | None:
    """Newest valid checkpoint of a run; partial or corrupt ones are skipped with a warning."""
    found, skipped = newest_valid(run_dir, deep=deep)
    for why in skipped:
        warnings.warn(f"skipping {why}", stacklevel=2)
    return found


def resolve(path: str | Path, deep: bool = True) -> Path:
    """A checkpoint directory, or a run directory (-> its newest valid checkpoint, checked
    ``deep``-ly so that a corrupt newest one falls back to the one before)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_dir():
        raise CheckpointError(f"not a checkpoint or run directory (a file): {p}")
    if (p / MANIFEST).is_file() or (p / "model.safetensors").exists():
        return p
    if (p / "checkpoints").is_dir():
        latest = latest_checkpoint(p, deep=deep)
        if latest is None:
            raise CheckpointError(f"no complete checkpoint in run directory {p}")
        return latest
    raise CheckpointError(f"not a checkpoint or run directory: {p}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: leave its files alone
    return True


def clean_stale(ck_dir: str | Path) -> list[Path]:
    """Remove the temporary folders of checkpoint writers that are no longer running.

    ``.tmp-NAME-PID`` (a checkpoint being written) is deleted; ``.old-NAME-PID`` (the previous
    copy of a checkpoint being replaced) is renamed back to NAME if the writer died before the
    new copy was in place, else deleted. Folders of live processes are left alone.
    """
    ck = Path(ck_dir)
    removed: list[Path] = []
    if not ck.is_dir():
        return removed
    for p in sorted(ck.iterdir()):
        m = _TEMP.fullmatch(p.name)
        if not m or _pid_alive(int(m.group(3))):
            continue
        kind, name = m.group(1), m.group(2)
        if kind == "old" and not (ck / name).exists():
            os.replace(p, ck / name)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` valid checkpoints by step number; delete the older ones
    (valid or not) and dead writers' temporary folders.

    Invalid checkpoints *newer* than the newest valid one are left alone (they are evidence,
    skipped on resume, and replaced when training reaches their step again).
    """
    ck = Path(run_dir) / "checkpoints"
    clean_stale(ck)
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(run_dir)
    valid = [p for p in ckpts if is_valid(p, deep=True)]
    if not valid:
        return
    kept = valid[-keep_last:]
    oldest_kept = step_of(kept[0])
    keep = pinned(run_dir)
    if "*" in keep:  # an unreadable pin: prune nothing rather than guess
        return
    for p in ckpts:
        if p not in kept and step_of(p) <= oldest_kept and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


#: ``RUN/pins/*.json``: checkpoints another run uses (a distillation's teacher), which pruning keeps.
PINS = "pins"


def pin(checkpoint: str | Path, by: str | Path) -> Path | None:
    """Keep ``checkpoint`` from pruning while the run ``by`` (a distillation from it) exists.

    Continuing the teacher's run would otherwise delete the very checkpoint the student was
    distilled from (``train.keep_last``), and resuming the student would fail. The pin is a
    small JSON file in the teacher run's ``pins/`` folder (named by the student's path);
    it is dropped by :func:`pinned` once the student's directory is gone. Returns the pin,
    or None when ``checkpoint`` is not a step of a run (nothing prunes it) or its run is
    read-only (nothing prunes it there either).
    """
    ck = Path(checkpoint).resolve()
    if step_of(ck) is None or ck.parent.name != "checkpoints":
        return None
    by = str(Path(by).resolve())
    path = ck.parent.parent / PINS / (hashlib.sha256(by.encode()).hexdigest()[:16] + ".json")
    try:
        path.parent.mkdir(exist_ok=True)
        write_text(path, json.dumps({"checkpoint": ck.name, "by": by}) + "\n")
    except OSError:
        return None
    return path


def pinned(run_dir: str | Path) -> set[str]:
    """Names of a run's checkpoints pinned by runs that still exist (stale pins are removed)."""
    names: set[str] = set()
    d = Path(run_dir) / PINS
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            name, by = doc["checkpoint"], doc["by"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            names.add("*")
            continue
        if Path(by).exists():
            names.add(name)
        else:
            path.unlink(missing_ok=True)
    return names
