"""Checkpoints: one directory per checkpoint, written atomically, loaded strictly.

Layout of a checkpoint directory::

    config.json          resolved RunConfig (rebuilds the model without the command)
    model.safetensors    raw weights of the method module
    ema.safetensors      EMA weights (optional)
    optimizer.pt         optimiser + LR-scheduler state (optional; training only)
    trainer_state.json   step, data position, tokens seen, ... (optional; training only)
    rng.pt               every RNG state (optional; training only)
    tokenizer/           the tokenizer, so sampling needs nothing else
    manifest.json        size and sha256 of every file above; written last

A run directory keeps its checkpoints under ``checkpoints/step_XXXXXXXX``. A
checkpoint is first written to a hidden temporary directory and renamed into
place, so a crash at any moment leaves either the old set or the new one. A
directory without a valid manifest is partial or corrupt: resuming skips it
with a warning; loading it explicitly is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmlm.errors import CheckpointError

MANIFEST = "manifest.json"
PREFIX = "step_"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
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


def _state_to_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared storage and non-contiguous tensors; clone to be safe.
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in state.items()}, str(path))


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
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _state_to_safetensors(model_state, tmp / "model.safetensors")
    if ema_state is not None:
        _state_to_safetensors(ema_state, tmp / "ema.safetensors")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    if trainer_state is not None:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    if rng_state is not None:
        torch.save(rng_state, tmp / "rng.pt")
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
    return final


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
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"corrupt checkpoint manifest: {mpath}") from None
    for name, meta in files.items():
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint file missing: {p}")
        if p.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint file truncated or changed: {p}")
        if deep and _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file corrupt (checksum mismatch): {p}")
    for required in ("config.json", "model.safetensors"):
        if required not in files:
            raise CheckpointError(f"checkpoint lacks {required}: {d}")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (complete or not)."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted((p for p in ck.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path, deep: bool = False) -> Path | None:
    """Newest valid checkpoint of a run; partial or corrupt ones are skipped with a warning."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            verify(p, deep=deep)
            return p
        except CheckpointError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its newest valid checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / MANIFEST).is_file() or (p / "model.safetensors").exists():
        return p
    if (p / "checkpoints").is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"no complete checkpoint in run directory {p}")
        return latest
    raise CheckpointError(f"not a checkpoint or run directory: {p}")


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale temp dirs."""
    ck = Path(run_dir) / "checkpoints"
    done = [p for p in list_checkpoints(run_dir) if (p / MANIFEST).is_file()]
    for p in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    if ck.is_dir():
        for p in ck.iterdir():
            if p.name.startswith((".tmp-", ".old-")) and not p.name.endswith(f"-{os.getpid()}"):
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
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint file {path}: {e}") from None
