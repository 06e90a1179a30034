"""Trees of plain containers and tensors stored as safetensors, their structure as JSON metadata: the optimiser
and RNG states of a checkpoint, with no pickle. Older checkpoints' .pt files are read with
``torch.load(weights_only=True)``."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fmlm.checkpoint.layout import LEGACY
from fmlm.errors import CheckpointError

_TREE_KEY = "fmlm_tree"


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
        why = next(
            (line.strip() for line in text.splitlines() if "Unsupported" in line),
            (text.splitlines() or [type(e).__name__])[0],
        )
        raise CheckpointError(f"corrupt checkpoint file {legacy} (read as plain tensors only): {why[:200]}") from None
