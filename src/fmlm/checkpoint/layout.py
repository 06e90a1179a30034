"""The layout of a checkpoint directory: its file names, its manifest and :func:`verify`, which checks a
directory against it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from fmlm.errors import CheckpointError

MANIFEST = "manifest.json"


PREFIX = "step_"


OPTIMIZER = "optimizer.safetensors"


RNG = "rng.safetensors"


LEGACY = {OPTIMIZER: "optimizer.pt", RNG: "rng.pt"}  # pickled by fmlm <= 0.x; read with weights_only


_STEP = re.compile(rf"{PREFIX}(\d+)")


_TEMP = re.compile(r"\.(tmp|old)-(.+)-(\d+)")  # .tmp-step_XXXXXXXX-PID / .old-step_XXXXXXXX-PID


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(directory: str | Path, deep: bool = True) -> None:
    """Raise CheckpointError unless ``directory`` is a complete, uncorrupted checkpoint."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint not found: {d}")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"incomplete checkpoint (no {MANIFEST}): {d}")
    try:
        files = json.loads(mpath.read_text())["files"]
        if not isinstance(files, dict) or not all(
            isinstance(name, str)
            and isinstance(meta, dict)
            and type(meta.get("size")) is int
            and isinstance(meta.get("sha256"), str)
            for name, meta in files.items()
        ):
            raise TypeError("bad entries")
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"corrupt checkpoint manifest: {mpath}") from None
    root = d.resolve()
    for name, meta in files.items():
        p = d / name
        if root not in (d / name).resolve().parents:
            raise CheckpointError(f"corrupt checkpoint manifest (a path outside the checkpoint): {mpath}")
        if not p.is_file():
            raise CheckpointError(f"checkpoint file missing: {p}")
        if p.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint file truncated or changed: {p}")
        if deep and _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file corrupt (checksum mismatch): {p}")
    for required in ("config.json", "model.safetensors"):
        if required not in files:
            raise CheckpointError(f"checkpoint lacks {required}: {d}")


def read_json(path: Path) -> dict:
    """A checkpoint's JSON object (config, trainer state); CheckpointError if it is not one."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"corrupt checkpoint file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"corrupt checkpoint file {path}: expected a JSON object, got a {type(obj).__name__}")
    return obj
