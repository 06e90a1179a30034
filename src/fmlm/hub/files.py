"""Hugging Face-style model directories: writing one, checking one, and moving one to and from the Hub.

Layout (every file JSON or safetensors; nothing is ever unpickled)::

    config.json          the resolved RunConfig
    model.safetensors    the weights (the EMA weights by default)
    tokenizer/           the tokenizer (meta.json + vocab.json or tokenizer.json)
    manifest.json        size and sha256 of the three above: the directory is also an fmlm
                         checkpoint, so ``fmlm sample --ckpt DIR`` and ``fmlm eval --ckpt DIR`` take it
    README.md            the model card (:mod:`fmlm.hub.card`); not in the manifest, so it may be
                         edited (e.g. on the Hub) without breaking the checksums
    export.json          which weights (``ema`` or ``raw``), where they came from, fmlm's version
    eval.json            the ``fmlm eval`` result of the card's table, when there is one

The directory is built in a hidden sibling and renamed into place, so an interrupted export
leaves the previous copy (or nothing), never half a model. The Hub is reached through
``huggingface_hub`` (the ``hub`` extra), which caches downloads in its usual cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

import fmlm.hub.card as card
from fmlm.errors import CheckpointError, FmlmError

CARD = "README.md"
EVAL = "eval.json"
EXPORT = "export.json"
REQUIRED = ("config.json", "model.safetensors", "tokenizer/meta.json", "manifest.json")
# What a download fetches: the model's files, nothing else a repository may hold.
PATTERNS = ["config.json", "model.safetensors", "manifest.json", "tokenizer/*", CARD, EVAL, EXPORT]
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def source_info(path: str | Path | None) -> dict[str, Any]:
    """Where a checkpoint came from, for the card: its directory name and training step."""
    if path is None:
        return {}
    p = Path(path)
    info: dict[str, Any] = {"checkpoint": p.name}
    try:
        step = json.loads((p / "trainer_state.json").read_text()).get("step")
        info["step"] = step if isinstance(step, int) else None
    except (OSError, ValueError, AttributeError):
        pass
    return info


def weights_of(path: str | Path, ema: bool = True) -> str:
    """Which weights loading ``path`` gives: ``ema`` or ``raw`` (an exported directory says which it holds)."""
    p = Path(path)
    try:
        saved = json.loads((p / EXPORT).read_text()).get("weights")
        if saved in ("ema", "raw"):
            return saved
    except (OSError, ValueError, AttributeError):
        pass
    return "ema" if ema and (p / "ema.safetensors").is_file() else "raw"


def find_eval(path: str | Path | None) -> dict[str, Any] | None:
    """An ``eval.json`` beside a checkpoint (the checkpoint's own, then its run's), or None."""
    if path is None:
        return None
    p = Path(path)
    for f in (p / EVAL, p.parent.parent / EVAL if p.parent.name == "checkpoints" else None):
        if f is not None and f.is_file():
            return read_eval(f)
    return None


def read_eval(path: str | Path) -> dict[str, Any]:
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FmlmError(f"cannot read the eval result {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(result, dict) or not isinstance(result.get("results"), list):
        raise FmlmError(f"{path} is not an `fmlm eval` result (no 'results' list)")
    return result


def save_pretrained(
    directory: str | Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    tokenizer,
    *,
    weights: str = "ema",
    name: str | None = None,
    source: dict[str, Any] | None = None,
    eval_result: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory (layout above) atomically; returns its path."""
    from fmlm import __version__
    from fmlm.bench.metrics import git_commit
    from fmlm.checkpoint import save_checkpoint
    from fmlm.io import replace_dir, write_text

    final = Path(directory)
    if final.exists() and not final.is_dir():
        raise FmlmError(f"cannot export to {final}: it is a file")
    if final.is_dir() and any(final.iterdir()) and not (final / CARD).is_file():
        raise FmlmError(f"refusing to export into {final}: a non-empty directory that is not an fmlm model")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-export-{final.name}-{os.getpid()}"
    commit = git_commit()
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(tmp, config, state, tokenizer)
        text = card.render(
            config,
            name=name or final.name,
            weights=weights,
            num_params=sum(v.numel() for v in state.values()),
            version=__version__,
            commit=commit,
            source=source,
            eval_result=eval_result,
        )
        write_text(tmp / CARD, text)
        info = {"weights": weights, "source": source or {}, "fmlm_version": __version__, "commit": commit}
        write_text(tmp / EXPORT, json.dumps(info, indent=2) + "\n")
        if eval_result is not None:
            write_text(tmp / EVAL, json.dumps(eval_result, indent=2) + "\n")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_pretrained(directory: str | Path) -> Path:
    """Raise CheckpointError (one line) unless ``directory`` is an fmlm model directory: a card whose
    ``library_name`` is fmlm and every required file. The weights are checked when loading."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"model directory not found: {d}")
    if not (d / CARD).is_file():
        hint = "; fmlm.load reads run and checkpoint directories, `fmlm export` makes a model directory"
        raise CheckpointError(f"not an fmlm model directory (no {CARD} model card): {d}" + hint)
    try:
        meta = card.front_matter((d / CARD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read the model card {d / CARD}: {e}") from None
    lib = (meta or {}).get("library_name")
    if lib != card.LIBRARY:
        what = "no library_name" if lib is None else f"library_name {lib!r}"
        raise CheckpointError(f"{d} is not an fmlm model: its {CARD} has {what}, expected library_name: fmlm")
    for name in REQUIRED:
        if not (d / name).is_file():
            raise CheckpointError(f"model file missing: {d / name}")
    return d


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise FmlmError("the Hugging Face Hub needs huggingface_hub: pip install 'fmlm[hub]'") from None
    return huggingface_hub


def _hub_error(e: Exception, what: str) -> FmlmError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointError(f"{what}: {type(e).__name__}: {first[:300]}")


def resolve(
    name: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> Path:
    """A local model directory, or a Hub id (``owner/name``) downloaded to the Hub's cache."""
    p = Path(name)
    if p.exists():
        if revision is not None:
            raise FmlmError(f"revision applies to Hub ids, not to the local directory {p}")
        return check_pretrained(p)
    if not _HUB_ID.fullmatch(str(name)):
        raise CheckpointError(f"model not found: {name} (neither a local directory nor a Hub id owner/name)")
    hub = _hub()
    try:
        local = hub.snapshot_download(
            repo_id=str(name),
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            allow_patterns=PATTERNS,
            local_files_only=local_files_only,
            token=token,
        )
    except Exception as e:  # the hub's errors (not found, offline, HTTP, ...) all become one line
        raise _hub_error(e, f"cannot download {name}" + (f"@{revision}" if revision else "")) from None
    return check_pretrained(local)


def push(
    directory: str | Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
):
    """Upload a model directory to the Hub repository ``repo_id`` (created if missing); returns
    the hub's commit info."""
    check_pretrained(directory)
    if not _HUB_ID.fullmatch(repo_id):
        raise FmlmError(f"bad Hub repository id {repo_id!r} (expected owner/name)")
    hub = _hub()
    api = hub.HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:  # the Hub uploads to existing branches only
            api.create_branch(repo_id=repo_id, repo_type="model", branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(directory),
            revision=revision,
            commit_message=commit_message or "Upload fmlm model",
        )
    except Exception as e:
        raise _hub_error(e, f"cannot upload to {repo_id}") from None
