"""A run directory's state besides the weights: the trainer's counters, the RNG states, the resume check, and the
checks and archiving done before a run starts."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

import fmlm.train.distributed as dist_
from fmlm.config import RunConfig, flatten
from fmlm.errors import CheckpointError, ConfigError, FmlmError
from fmlm.io import write_text

# Keys that may change between a run and its resumption (budget and bookkeeping only).
RESUMABLE_KEYS = {
    "train.max_steps",
    "train.max_minutes",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.keep_last",
    "train.log_to",
    "train.threads",
    "train.device",
    "sample.steps",
    "sample.num_samples",
    "sample.seed",
    "sample.float64",
    "data.cache_dir",
    # How the global batch is computed (devices, accumulation, sharding, compilation, noise path):
    # a run may resume on another number of devices.
    "train.micro_batch_size",
    "train.distributed",
    "train.compile",
    "train.noise",
}


def check_resumable(saved: dict, current: dict) -> None:
    # A key the saved config lacks (written by an older version) counts as its default.
    defaults = flatten(RunConfig().to_dict())
    a = {**{k: v for k, v in defaults.items() if k in flatten(current)}, **flatten(saved)}
    b = flatten(current)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS and k != "preset")
    if diff:
        k = diff[0]
        raise ConfigError(
            f"run directory holds a run with a different config ({k}: {a.get(k)!r} -> {b.get(k)!r}); "
            "use another --run-dir or --no-resume"
        )


def rng_state(gen: torch.Generator, env: dist_.DistEnv | None = None) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "train_generator": gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if env is not None and env.enabled:  # every rank's global RNGs (e.g. dropout masks differ per rank)
        own = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            own["cuda"] = torch.cuda.get_rng_state()
        state["ranks"] = dist_.gather_objects(env, own)
    return state


def set_rng_state(state: dict, gen: torch.Generator, env: dist_.DistEnv | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["train_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    ranks = state.get("ranks")
    if ranks and env is not None and env.enabled and env.rank < len(ranks):
        torch.set_rng_state(ranks[env.rank]["torch"])
        if "cuda" in ranks[env.rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ranks[env.rank]["cuda"])


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # index into the epoch's permutation
    tokens: int = 0
    elapsed: float = 0.0  # training seconds over all sessions of this run
    bad_steps: int = 0
    last_val: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: Path | str = "trainer_state.json") -> "TrainState":
        """Strict: unknown keys, wrong types or negative counts raise CheckpointError (one line)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise CheckpointError(f"corrupt checkpoint file {where}: unknown key {unknown[0]!r}")
        out = cls()
        for k, v in d.items():
            if k == "last_val":
                ok = isinstance(v, dict) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()
                )
            elif k == "elapsed":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            else:
                ok = type(v) is int and v >= 0
            if not ok:
                raise CheckpointError(f"corrupt checkpoint file {where}: bad value for {k}: {json.dumps(v)[:40]}")
            setattr(out, k, float(v) if k == "elapsed" else v)
        return out


def check_run_dir(run_dir: Path) -> None:
    """The run directory (and its checkpoints/) can be created and written to, before any work."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a directory")
    for d in (run_dir, run_dir / "checkpoints"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise FmlmError(
                f"cannot write in {d}: {e.strerror or e}; training would be lost at the first "
                "checkpoint (use another --run-dir)"
            ) from None


def _free_space_note(path: Path) -> str:
    try:
        return f" ({shutil.disk_usage(path).free / 2**20:.0f} MiB free)"
    except OSError:
        return ""


def check_free_space(run_dir: Path, method: torch.nn.Module) -> None:
    """Refuse to start when the disk cannot hold even one more checkpoint (weights, EMA, Adam moments)."""
    n_bytes = sum(p.numel() * p.element_size() for p in method.parameters())
    need = 4 * n_bytes + 4 * 2**20  # model + EMA + two moments, plus tokenizer and JSON
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return
    if free < need:
        raise FmlmError(
            f"not enough free space in {run_dir}: {free / 2**20:.1f} MiB free, a checkpoint needs "
            f"about {need / 2**20:.1f} MiB; free some space or use another --run-dir"
        )


def archive_run(run_dir: Path, log=print) -> Path | None:
    """Move a run's log, checkpoints, config and summary into ``archive/<UTC time>/`` (``--restart``)."""
    logs = ("tensorboard", "wandb", "wandb.json")  # the other train.log_to writers' files
    names = [n for n in ("log.jsonl", "checkpoints", "config.json", "summary.json", *logs) if (run_dir / n).exists()]
    ck = run_dir / "checkpoints"
    if names == ["checkpoints"] and not any(ck.iterdir()):
        return None  # nothing but the (empty) checkpoints/ made by check_run_dir
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = run_dir / "archive" / stamp
    k = 1
    while dest.exists():
        k += 1
        dest = run_dir / "archive" / f"{stamp}-{k}"
    try:
        dest.mkdir(parents=True)
        for n in names:
            os.replace(run_dir / n, dest / n)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
    except OSError as e:
        raise FmlmError(f"cannot archive the old run in {run_dir}: {e.strerror or e}") from None
    log(f"restart: the previous run's {', '.join(names)} moved to {dest}")
    return dest


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (written after the checkpoint a killed run resumes from),
    so the log of a resumed run reads like that of an uninterrupted one."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    write_text(path, "".join(l + "\n" for l in keep))
