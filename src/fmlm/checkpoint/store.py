"""Writing a checkpoint atomically (temporary directory, manifest last, rename) and loading its weights strictly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmlm.checkpoint.layout import MANIFEST, OPTIMIZER, RNG, _sha256
from fmlm.checkpoint.runs import clean_stale
from fmlm.checkpoint.trees import save_tree
from fmlm.errors import CheckpointError
from fmlm.io import fsync_dir, replace_dir

_fsync_dir = fsync_dir


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


def _write_files(
    tmp: Path, config, model_state, tokenizer, ema_state, optimizer_state, trainer_state, rng_state
) -> None:
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
    """Rename a complete temporary checkpoint into place (an existing one of the same step is moved
    aside first, so there is never a moment without a complete copy on disk)."""
    replace_dir(tmp, final)


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
