"""Checkpoints: one directory per checkpoint, written atomically, loaded strictly.

Layout of a checkpoint directory::

    config.json          resolved RunConfig (rebuilds the model without the command)
    model.safetensors    raw weights of the method module
    ema.safetensors      EMA weights (optional)
    optimizer.safetensors  optimiser + LR-scheduler state (optional; training only)
    trainer_state.json   step, data position, tokens seen, ... (optional; training only)
    rng.safetensors      every RNG state (optional; training only)
    tokenizer/           the tokenizer, so sampling needs nothing else
    manifest.json        size and sha256 of every file above; written last

A run directory keeps its checkpoints under ``checkpoints/step_XXXXXXXX``. A
checkpoint is first written to a hidden temporary directory and renamed into
place, so a crash at any moment leaves either the old set or the new one. A
directory without a valid manifest is partial or corrupt: resuming skips it
with a warning; loading it explicitly is an error.

Nothing in a checkpoint is unpickled: weights are safetensors, and the optimiser and
RNG states are trees of plain containers and tensors stored as safetensors, their
structure as JSON in the file's metadata (:func:`save_tree`, :func:`load_tree`).
Checkpoints of older versions (``optimizer.pt``, ``rng.pt``) are read with
``torch.load(weights_only=True)``, which only accepts tensors, plain containers and
numpy's RNG arrays; anything else is refused with a one-line error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fmlm.errors import CheckpointError
from fmlm.io import fsync_dir

MANIFEST = "manifest.json"
PREFIX = "step_"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
LEGACY = {OPTIMIZER: "optimizer.pt", RNG: "rng.pt"}  # pickled by fmlm <= 0.x; read with weights_only
_TREE_KEY = "fmlm_tree"
_STEP = re.compile(rf"{PREFIX}(\d+)")
_TEMP = re.compile(r"\.(tmp|old)-(.+)-(\d+)")  # .tmp-step_XXXXXXXX-PID / .old-step_XXXXXXXX-PID


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_fsync_dir = fsync_dir


def _state_to_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared storage and non-contiguous tensors; clone to be safe.
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in state.items()}, str(path))


# ------------------------------------------------------------------ trees of tensors, no pickle
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able image of ``obj``; tensors go to ``tensors`` and are referenced by name."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().contiguous().clone().cpu()
        return {"$tensor": name}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"$dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (tensors and plain containers only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if set(obj) == {"$ndarray", "dtype"}:
        return np.asarray(obj["$ndarray"], dtype=np.dtype(obj["dtype"]))
    if len(obj) == 1 and "$float" in obj:
        return float(obj["$float"])
    if len(obj) == 1 and "$tuple" in obj:
        return tuple(_decode(v, tensors) for v in obj["$tuple"])
    if len(obj) == 1 and "$dict" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["$dict"]}
    if any(k.startswith("$") for k in obj):
        raise ValueError(f"unknown entry {sorted(obj)[0]!r}")
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(obj: Any, path: str | Path) -> None:
    """Store a tree of dicts, lists, tuples, numbers, strings, tensors and numpy arrays (e.g. an
    optimiser's ``state_dict()`` or RNG states) as one safetensors file: the tensors as
    tensors, the structure as JSON in the metadata. Loading it runs no code."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    save_file(tensors, str(path), metadata={_TREE_KEY: json.dumps(tree)})


def load_tree(path: str | Path) -> Any:
    """Inverse of :func:`save_tree`; CheckpointError (one line) on a damaged or foreign file."""
    f = Path(path)
    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        if _TREE_KEY not in meta:
            raise ValueError("no fmlm state in its metadata")
        return _decode(json.loads(meta[_TREE_KEY]), tensors)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {f}") from None
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"corrupt checkpoint file {f}: {msg}") from None


def _legacy_safe_globals() -> list:
    """What ``weights_only`` needs beyond tensors for numpy's RNG state in old ``rng.pt`` files."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]


def load_training_state(path: str | Path, name: str) -> Any:
    """The optimiser (``optimizer.safetensors``) or RNG (``rng.safetensors``) state of a checkpoint.

    Checkpoints of older versions hold pickles (``optimizer.pt``, ``rng.pt``) instead: those
    are read with ``torch.load(weights_only=True)``, which builds only tensors, plain containers
    and numpy arrays and refuses anything else (a pickle that would run code) with one line.
    """
    d = Path(path)
    if (d / name).is_file():
        return load_tree(d / name)
    legacy = d / LEGACY[name]
    if not legacy.is_file():
        raise CheckpointError(f"checkpoint file missing: {d / name}")
    allowed = _legacy_safe_globals()
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: allowed for this load only
        scope = torch.serialization.safe_globals(allowed)
    else:  # torch 2.4
        torch.serialization.add_safe_globals(allowed)
        scope = contextlib.nullcontext()
    try:
        with scope, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... all mean: not a plain state file
        text = str(e)
        with open(legacy, "rb") as f:
            head = f.read(2)
        if "GLOBAL" in text or "Unsupported global" in text or head[:1] == b"\x80" or head == b"PK":
            # A pickle (raw, or torch.save's zip) that wants more than tensors and plain containers.
            raise CheckpointError(
                f"refusing to unpickle {legacy}: it holds objects other than tensors and plain containers "
                "(a checkpoint must not run code); delete that checkpoint to resume from an older one, or start over "
                "with --restart"
            ) from None
        why = next((line.strip() for line in text.splitlines() if "Unsupported" in line),
                   (text.splitlines() or [type(e).__name__])[0])
        raise CheckpointError(f"corrupt checkpoint file {legacy} (read as plain tensors only): {why[:200]}") from None


def save_checkpoint(
    directory: str | Path,
    config: dict[str, Any],
    model_state: dict[str, torch.Tensor],
    tokenizer=None,
    ema_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    trainer_state: dict | None = None,
    rng_state: dict | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temp dir, fsync, rename). Returns its path."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)  # a dead run's half-written checkpoint may be what filled the disk
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_files(tmp, config, model_state, tokenizer, ema_state, optimizer_state, trainer_state, rng_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. disk full: leave nothing half-written behind
        raise
    _install(tmp, final)
    return final


def _write_files(tmp: Path, config, model_state, tokenizer, ema_state, optimizer_state, trainer_state,
                 rng_state) -> None:
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _state_to_safetensors(model_state, tmp / "model.safetensors")
    if ema_state is not None:
        _state_to_safetensors(ema_state, tmp / "ema.safetensors")
    if optimizer_state is not None:
        save_tree(optimizer_state, tmp / OPTIMIZER)
    if trainer_state is not None:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    if rng_state is not None:
        save_tree(rng_state, tmp / RNG)
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"format": 1, "files": manifest}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _install(tmp: Path, final: Path) -> None:
    """Rename a complete temporary checkpoint into place."""
    if final.exists():
        # Replacing an existing checkpoint (same step): move the old one aside first,
        # so there is never a moment without a complete copy on disk.
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


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
                isinstance(name, str) and isinstance(meta, dict) and type(meta.get("size")) is int
                and isinstance(meta.get("sha256"), str) for name, meta in files.items()):
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
            for p in sorted(path.rglob("*")) if p.is_file())
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
    for p in ckpts:
        if p not in kept and step_of(p) <= oldest_kept:
            shutil.rmtree(p, ignore_errors=True)


def load_state(path: Path, name: str) -> dict[str, torch.Tensor]:
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"checkpoint file missing: {f}")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupt weights file {f}: {str(e).splitlines()[0]}") from None


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with a one-line error on missing/unexpected keys or shape mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"{what} does not match the model: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}"
            )
    module.load_state_dict(state, strict=True)


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
