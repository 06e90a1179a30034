"""Every finished setting of a bench, saved as soon as it is measured, so a killed bench resumes.

A setting is one (run, step count) pair of a bench: its samples, their timing and entropy,
and their scores. Sampling dominates a real-text bench (a 1,024-step setting is minutes on
a CPU), so each finished setting is written atomically to
``CACHE/settings/LABEL-RUNKEY/steps{S}-n{N}-seed{SEED}-batch{B}.json`` and a bench that is
killed, or run again with another scorer, samples only what is missing. A saved setting is
reused only when it was measured from the same checkpoint (the SHA-256 of its
``manifest.json``, which lists every weight file's hash) with the same thread count and
device, so its timings stay comparable with the bench's fresh ones; its score is reused
under the same scorer and recomputed from the saved texts under another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fmlm.bench.metrics import score_texts
from fmlm.io import write_text

VERSION = 1


def checkpoint_id(checkpoint: str | Path) -> str | None:
    """The SHA-256 of a checkpoint's ``manifest.json`` (None when it has none)."""
    path = Path(checkpoint) / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


class SettingCache:
    """Saved settings of one bench cache directory (``enabled=False``: never read, still written)."""

    def __init__(self, cache_dir: str | Path, threads: int, device: str, enabled: bool = True, log=None):
        self.root = Path(cache_dir) / "settings"
        self.threads, self.device, self.enabled = threads, device, enabled
        self.log = log or (lambda msg: None)
        self.reused = 0

    def path(self, label: str, run_key: str, steps: int, num_samples: int, seed: int, batch: int) -> Path:
        return self.root / f"{label}-{run_key}" / f"steps{steps}-n{num_samples}-seed{seed}-batch{batch}.json"

    def _identity(self, checkpoint, steps: int, num_samples: int, seed: int, batch: int) -> dict:
        return {
            "version": VERSION,
            "checkpoint_id": checkpoint_id(checkpoint),
            "steps": steps,
            "num_samples": num_samples,
            "seed": seed,
            "sample_batch": batch,
            "threads": self.threads,
            "device": self.device,
        }

    def load(self, rec: dict, steps: int, num_samples: int, seed: int, batch: int, scorer):
        """``(row, samples)`` of a saved setting, scored under ``scorer``; None if there is none to reuse."""
        if not self.enabled:
            return None
        path = self.path(rec["label"], rec["key"], steps, num_samples, seed, batch)
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None  # none yet, or unreadable: measure it again (and overwrite it)
        ident = self._identity(rec["checkpoint"], steps, num_samples, seed, batch)
        if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in ident.items()):
            return None
        samples, row = saved.get("samples"), dict(saved.get("row") or {})
        if not isinstance(samples, list) or len(samples) != num_samples or not row:
            return None
        if scorer is not None:
            name = scorer.describe().get("name")
            scores = saved.setdefault("scores", {})
            if name not in scores:
                scores[name] = score_texts([s["text"] for s in samples], [s["ended"] for s in samples], scorer)
                write_text(path, json.dumps(saved) + "\n")
            row.update(scores[name])
        self.reused += 1
        self.log(f"{rec['label']} {steps} steps: reused the saved setting {path.name}")
        return row, samples

    def save(self, rec: dict, steps: int, num_samples: int, seed: int, batch: int, row, samples, scorer, scores):
        """Write one measured setting (its unscored row, its samples, and its score under ``scorer``)."""
        path = self.path(rec["label"], rec["key"], steps, num_samples, seed, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = {
            **self._identity(rec["checkpoint"], steps, num_samples, seed, batch),
            "label": rec["label"],
            "run_key": rec["key"],
            "row": row,
            "samples": samples,
            "scores": {scorer.describe().get("name"): scores} if scorer is not None else {},
        }
        write_text(path, json.dumps(saved) + "\n")  # atomic: a killed bench never leaves half a setting
