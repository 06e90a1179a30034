"""One training loop for every method.

The loop knows nothing about noise processes: it asks the method for
``loss(ids, generator)`` and ``eval_loss(ids, generator)``. It owns the device,
precision, optimiser (AdamW + warm-up), gradient clipping, EMA, logging
(JSONL + progress bar), periodic evaluation, atomic checkpoints and resume.

Resume is exact: the data order is a pure function of (seed, epoch), and the
step, data position, optimiser, scheduler, EMA and every RNG state are stored in
each checkpoint, so a resumed run continues the same trajectory.

Under ``torchrun`` (see :mod:`fmlm.distributed`) the same loop runs on every rank:
``train.batch_size`` is the global batch, split into equal parts of
``micro_batch_size`` over ranks and accumulation steps; part k = j·W + r (micro-step j,
rank r) takes the k-th slice of the global batch's indices, and its noise comes from a
generator seeded by (step seed, k), with times stratified over the whole global batch.
So a run depends on the global and micro batch sizes, not on how the parts are spread
over devices: W ranks with accumulation a match one process with accumulation W·a.
Logging, evaluation and checkpoints happen on rank 0 (all ranks under FSDP, whose state
is sharded); the others wait in barriers.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmlm import checkpoint as ckpt
from fmlm import distributed as dist_
from fmlm.config import RunConfig
from fmlm.errors import CheckpointError, ConfigError, FmlmError
from fmlm.io import write_json, write_text
from fmlm.methods import build_method
from fmlm.methods.flm import global_strata

# Keys that may change between a run and its resumption (budget and bookkeeping only).
RESUMABLE_KEYS = {
    "train.max_steps", "train.max_minutes", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.save_every", "train.keep_last", "train.threads", "train.device", "sample.steps",
    "sample.num_samples", "sample.seed", "sample.float64", "data.cache_dir",
    # How the global batch is computed (devices, accumulation, sharding, compilation, noise path):
    # a run may resume on another number of devices.
    "train.micro_batch_size", "train.distributed", "train.compile", "train.noise",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("FMLM_CACHE", Path.home() / ".cache" / "fmlm"))


def pick_device(name: str | torch.device | None = "auto", what: str = "train.device") -> torch.device:
    """The device ``name`` names (``auto``: cuda, then mps, then cpu), checked to exist in this build."""
    if name is None:
        name = "auto"
    if isinstance(name, torch.device) or name != "auto":
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError, ValueError):
            raise ConfigError(f"bad value for {what}: {str(name)!r} (use auto, cpu, cuda, cuda:N or mps)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"{what}={dev} but this PyTorch build has no usable CUDA device; use cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(f"{what}={dev} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        elif dev.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise ConfigError(f"{what}={dev} but MPS is not available on this machine; use cpu")
        elif dev.type != "cpu":
            raise ConfigError(f"{what}={dev}: fmlm runs on cpu, cuda or mps")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it (``auto``); None means full fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPU autocast in bf16 is slower than fp32 on most CPUs


def load_data(cfg: RunConfig, tokenizer=None):
    """Build the DataBundle for a config (tokenizer fixed when resuming or evaluating)."""
    from fmlm.data import build_data

    d = cfg.data
    phrases = dict(n=d.phrases_n, k=d.phrases_k, phrases_per_seq=d.phrases_per_seq,
                   vocab_size=d.phrases_vocab or None, seed=d.seed)
    return build_data(
        dataset=d.dataset, tokenizer=d.tokenizer, seq_len=d.seq_len,
        cache_dir=Path(d.cache_dir) if d.cache_dir else default_cache_dir(),
        packing=d.packing, val_fraction=d.val_fraction, seed=d.seed,
        phrases=phrases if d.dataset == "phrases" else None, tokenizer_obj=tokenizer,
    )


class EMA:
    """Exponential moving average of parameters (float32 shadow copies).

    The decay warms up as min(decay, (1 + n)/(10 + n)) after n updates, so a short run's
    EMA is not dominated by its first, untrained weights (with decay 0.999 and no warm-up,
    a 1,000-step run's EMA still carries ~37% of the initialisation).
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, num_updates: int | None = None) -> None:
        decay = self.decay if num_updates is None else min(self.decay, (1 + num_updates) / (10 + num_updates))
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.detach().float(), 1.0 - decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


def lr_lambda(cfg: RunConfig):
    t = cfg.train

    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        if t.lr_schedule == "cosine":
            progress = min(1.0, step / max(1, t.max_steps))
            return warm * 0.5 * (1 + math.cos(math.pi * progress))
        return warm

    return f


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resumable(saved: dict, current: dict) -> None:
    # A key the saved config lacks (written by an older version) counts as its default.
    defaults = _flatten(RunConfig().to_dict())
    a = {**{k: v for k, v in defaults.items() if k in _flatten(current)}, **_flatten(saved)}
    b = _flatten(current)
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
                ok = isinstance(v, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 for x in v.values())
            elif k == "elapsed":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            else:
                ok = type(v) is int and v >= 0
            if not ok:
                raise CheckpointError(f"corrupt checkpoint file {where}: bad value for {k}: {json.dumps(v)[:40]}")
            setattr(out, k, float(v) if k == "elapsed" else v)
        return out


class _Shadow(torch.nn.Module):
    """Lets :func:`fmlm.checkpoint.load_into` check EMA weights against the EMA's own keys and shapes."""

    def __init__(self, shadow: dict[str, torch.Tensor]):
        super().__init__()
        self._shadow = shadow

    def state_dict(self, *a, **k):  # type: ignore[override]
        return self._shadow

    def load_state_dict(self, state, strict=True, assign=False):  # type: ignore[override]
        return None  # checked only; EMA.load_state_dict copies


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
            raise FmlmError(f"cannot write in {d}: {e.strerror or e}; training would be lost at the first "
                            "checkpoint (use another --run-dir)") from None


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
        raise FmlmError(f"not enough free space in {run_dir}: {free / 2**20:.1f} MiB free, a checkpoint needs "
                        f"about {need / 2**20:.1f} MiB; free some space or use another --run-dir")


def archive_run(run_dir: Path, log=print) -> Path | None:
    """Move a run's log, checkpoints, config and summary into ``archive/<UTC time>/`` (``--restart``)."""
    names = [n for n in ("log.jsonl", "checkpoints", "config.json", "summary.json") if (run_dir / n).exists()]
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


class Trainer:
    """Trains the method of ``cfg`` in ``run_dir``; ``fit()`` resumes when a checkpoint is there.

    A run never silently starts over: if the run directory has checkpoints and none of them is
    valid, the constructor raises :class:`CheckpointError` and changes nothing. ``restart=True``
    (``fmlm train --restart``) starts over on purpose, after moving the old log, checkpoints and
    summary into ``archive/<time>/`` of the run directory.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = True, progress: bool = True,
                 log=print, tokenizer=None, restart: bool = False, on_step=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.on_step = on_step  # on_step(trainer, metrics) after every step, its evaluation and save
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.env, device_name = dist_.setup(t.device)
        try:
            self._init(cfg, resume and not restart, progress, log, tokenizer, device_name)
        except BaseException:
            dist_.cleanup(self.env, ok=False)  # every path out destroys the process group
            raise

    def _init(self, cfg: RunConfig, resume: bool, progress: bool, log, tokenizer, device_name: str) -> None:
        t = cfg.train
        main = self.env.is_main
        self.progress = progress and main
        self.log = log if main else (lambda *a, **k: None)
        self.device = pick_device(device_name)
        self.amp = autocast_dtype(t.precision, self.device)
        self.micro_batch, self.accum = dist_.grad_accumulation(t.batch_size, t.micro_batch_size,
                                                               self.env.world_size)

        # deep=True: a checkpoint with a flipped byte is skipped (with a warning) like a partial one.
        # Rank 0 chooses, so every rank resumes from the same checkpoint (or fails with the same error).
        found, problem = None, None
        if main:
            try:
                check_run_dir(self.run_dir)
                if resume:
                    found = self._find_resume_point()
                else:
                    archive_run(self.run_dir, self.log)
            except FmlmError as e:
                problem = (type(e).__name__, str(e))
        found, problem = dist_.broadcast_object(self.env, (None if found is None else str(found), problem))
        if problem is not None:
            raise {"CheckpointError": CheckpointError, "ConfigError": ConfigError}.get(problem[0], FmlmError)(
                problem[1])
        self.resume_from = None if found is None else Path(found)
        if self.resume_from is not None:
            saved = ckpt.read_json(self.resume_from / "config.json")
            if not isinstance(saved.get("model"), dict):
                raise CheckpointError(f"corrupt checkpoint file {self.resume_from / 'config.json'}: no model section")
            check_resumable({k: v for k, v in saved.items() if k != "model"},
                            {k: v for k, v in cfg.to_dict().items() if k != "model"})
            from fmlm.data import load_tokenizer
            tokenizer = load_tokenizer(self.resume_from / "tokenizer")
        # Rank 0 prepares (downloads, tokenises, caches) the data first; the others then read the cache.
        if main:
            self.data = load_data(cfg, tokenizer)
        dist_.barrier(self.env)
        if not main:
            self.data = load_data(cfg, tokenizer)
        cfg.model.vocab_size = self.data.tokenizer.vocab_size
        cfg.model.max_seq_len = cfg.data.seq_len
        if self.resume_from is not None:
            check_resumable(saved["model"], cfg.to_dict()["model"])

        torch.manual_seed(t.seed)  # same initial weights on every rank
        self.method = build_method(cfg, training=True).to(self.device)
        if hasattr(self.method, "bind_tokenizer"):  # e.g. a classifier whose labels come from the text
            self.method.bind_tokenizer(self.data.tokenizer)
        if hasattr(self.method, "noise"):
            self.method.noise = t.noise
        if t.compile:
            self.method.net.compile()
        if main:
            check_free_space(self.run_dir, self.method)
        self.model = dist_.wrap(self.method, self.env, t.distributed, self.device)
        self.opt = torch.optim.AdamW(self.method.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                                     weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.ema = EMA(self.method, t.ema)
        self.gen = torch.Generator(self.device).manual_seed(t.seed)
        if self.env.enabled:  # different dropout masks per rank; the training noise comes from self.gen
            torch.manual_seed(t.seed + 7919 * self.env.rank)
        self.state = TrainState()
        if self.resume_from is not None:
            self._load(self.resume_from)

    def _find_resume_point(self) -> Path | None:
        """The newest valid checkpoint; an error (changing nothing) if there are checkpoints but none is valid."""
        found, skipped = ckpt.newest_valid(self.run_dir, deep=True)
        if found is not None:
            for why in skipped:
                warnings.warn(f"skipping {why}", stacklevel=3)
        elif skipped:
            n = len(skipped)
            raise CheckpointError(
                f"none of the {n} checkpoint{'s' * (n > 1)} in {self.run_dir / 'checkpoints'} is valid (newest: "
                f"{skipped[0]}); nothing was changed: rerun with --restart to start over (the old log and "
                "checkpoints are archived), or use another --run-dir")
        return found

    @property
    def sharded(self) -> bool:
        return self.env.enabled and self.cfg.train.distributed == "fsdp"

    # ---------------------------------------------------------------- checkpoints
    def _load(self, path: Path) -> None:
        ckpt.verify(path, deep=True)
        weights = ckpt.load_state(path, "model.safetensors")
        ema = ckpt.load_state(path, "ema.safetensors")
        opt = ckpt.load_training_state(path, ckpt.OPTIMIZER)  # no pickle: tensors and plain containers
        rng = ckpt.load_training_state(path, ckpt.RNG)
        state = TrainState.from_dict(ckpt.read_json(path / "trainer_state.json"), path / "trainer_state.json")
        try:
            if not isinstance(opt, dict) or not isinstance(rng, dict):
                raise ValueError("not a state dictionary")
            if self.sharded:
                dist_.load_full_state(self.method, weights, self.opt, opt["optimizer"])
                for k, v in ema.items():
                    self.ema.shadow[k] = dist_.shard_like(v.float(), self.ema.shadow[k])
            else:
                ckpt.load_into(self.method, weights, "checkpoint weights")
                ckpt.load_into(_Shadow(self.ema.shadow), ema, "checkpoint EMA weights")
                self.ema.load_state_dict(ema)
                self.opt.load_state_dict(opt["optimizer"])
            self.sched.load_state_dict(opt["scheduler"])
            set_rng_state(rng, self.gen, self.env)
        except CheckpointError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            msg = (str(e).splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {msg[:200]}") from None
        self.state = state
        self.log(f"resumed from {path} at step {self.state.step}")

    def save(self) -> Path:
        """Write a checkpoint (rank 0; under FSDP every rank helps gather the state).

        A failure to write (disk full, read-only folder) is one line (FmlmError) on every rank;
        the checkpoints already on disk are untouched.
        """
        path = self.run_dir / "checkpoints" / f"{ckpt.PREFIX}{self.state.step:08d}"
        model_state, optim_state = dist_.full_state(self.method, self.opt)
        ema_state = {k: dist_.full_tensor(v) for k, v in self.ema.state_dict().items()}
        rng = rng_state(self.gen, self.env)
        problem = None
        if self.env.is_main:
            try:
                ckpt.save_checkpoint(
                    path, self.cfg.to_dict(), model_state, tokenizer=self.data.tokenizer,
                    ema_state=ema_state,
                    optimizer_state={"optimizer": optim_state, "scheduler": self.sched.state_dict()},
                    trainer_state=self.state.__dict__, rng_state=rng,
                )
                ckpt.prune(self.run_dir, self.cfg.train.keep_last)
            except OSError as e:
                problem = (f"cannot write checkpoint {path}: {e.strerror or e}{_free_space_note(path.parent)}; "
                           "the checkpoints already saved are intact")
        problem = dist_.broadcast_object(self.env, problem)  # also the barrier after the save
        if problem is not None:
            raise FmlmError(problem)
        return path

    # ---------------------------------------------------------------- data
    def next_indices(self) -> list[int]:
        """Indices of the next global batch: a pure function of (seed, epoch, position)."""
        n, B = len(self.data.train), self.cfg.train.batch_size
        ids: list[int] = []
        while len(ids) < B:
            if self.state.position >= n:
                self.state.epoch += 1
                self.state.position = 0
            perm = self._perm(self.state.epoch, n)
            take = min(B - len(ids), n - self.state.position)
            ids.extend(perm[self.state.position:self.state.position + take].tolist())
            self.state.position += take
        return ids

    def next_batch(self) -> torch.Tensor:
        """The next global batch (B, L) on this device (single-process use)."""
        return self.data.train.batch(self.next_indices()).to(self.device)

    def parts(self) -> list[tuple[int, torch.Tensor]]:
        """This rank's parts (k, ids) of the next global batch: part k = j·W + rank, j < accumulation.

        Parts of different ranks are disjoint, and together they are the global batch.
        """
        idx, m, W = self.next_indices(), self.micro_batch, self.env.world_size
        out = []
        for j in range(self.accum):
            k = j * W + self.env.rank
            out.append((k, self.data.train.batch(idx[k * m:(k + 1) * m]).to(self.device)))
        return out

    def _perm(self, epoch: int, n: int) -> torch.Tensor:
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            self._perm_cache = torch.randperm(n, generator=g)
            self._perm_epoch = epoch
        return self._perm_cache

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, use_ema: bool = True) -> dict:
        """Validation metrics over fixed batches with fixed noise (comparable across steps)."""
        model = self.method
        backup = None
        if use_ema:
            backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict({k: v.to(backup[k].dtype) for k, v in self.ema.state_dict().items()})
        model.eval()
        gen = torch.Generator(self.device).manual_seed(12345)
        n, B = len(self.data.val), self.cfg.train.batch_size
        sums: dict[str, float] = {}
        count = 0
        for b in range(self.cfg.train.eval_batches):
            idx = [(b * B + i) % n for i in range(B)]
            with self._autocast():
                batch = self.data.val.batch(idx).to(self.device)
                # Under FSDP through the wrapper (all ranks; it gathers the shards); under DDP rank 0
                # calls the bare module, since DDP's forward may broadcast buffers (a collective).
                m = self.model(batch, gen, evaluate=True) if self.sharded else model.eval_loss(batch, gen)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
        model.train()
        if backup is not None:
            model.load_state_dict(backup)
        return {f"val_{k}": v / count for k, v in sums.items()}

    def _evaluate_ranks(self) -> dict:
        """Rank 0 evaluates while the others wait (all ranks take part under FSDP)."""
        val = self.evaluate() if (self.env.is_main or self.sharded) else {}
        dist_.barrier(self.env)
        return val

    def _autocast(self):
        if self.amp is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp)

    # ---------------------------------------------------------------- one optimiser step
    def _forward_backward(self) -> tuple[dict, float]:
        """Loss and gradients of one global batch over this rank's parts; returns (metrics, grad norm)."""
        parts = self.parts()
        K = self.accum * self.env.world_size
        if K > 1:  # one seed per step (same on every rank) -> one generator per part
            step_seed = int(torch.randint(0, 2**62, (), generator=self.gen, device=self.device))
        sums: dict[str, torch.Tensor] = {}
        for j, (k, ids) in enumerate(parts):
            with dist_.no_sync(self.model, sync=j == len(parts) - 1):
                if K == 1:
                    gen, strata = self.gen, nullcontext()
                else:
                    gen = torch.Generator(self.device).manual_seed((step_seed + 1_000_003 * (k + 1)) % 2**63)
                    shared = torch.Generator(self.device).manual_seed(step_seed)
                    strata = global_strata(k, K, shared)
                with strata, self._autocast():
                    loss, metrics = self.model(ids, gen)
                # Non-finite losses still go through backward: their NaN gradients reach every rank
                # through the all-reduce, so all ranks skip the step together.
                (loss / self.accum).backward()
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + torch.as_tensor(v, dtype=torch.float32).detach()
            # The loss that was back-propagated decides whether the step is finite.
            sums[" objective"] = sums.get(" objective", 0.0) + loss.detach().float()
        metrics = dist_.mean_metrics(self.env, sums, self.accum)
        t = self.cfg.train
        gnorm = torch.nn.utils.clip_grad_norm_(self.method.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        return metrics, float(dist_.full_tensor(gnorm))

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train to ``max_steps`` (or the time budget); Ctrl-C finishes the current step, evaluation or
        save, writes a checkpoint and returns with ``interrupted`` set (a second Ctrl-C stops at once)."""
        ok = False
        try:
            with _GracefulInterrupt(self) as self._interrupt:
                out = self._fit()
            ok = True
            return out
        except OSError as e:  # the log, config or summary could not be written (disk full, read-only)
            where = f" {e.filename}" if getattr(e, "filename", None) else f" in {self.run_dir}"
            raise FmlmError(f"cannot write{where}: {e.strerror or e}{_free_space_note(self.run_dir)}") from None
        finally:
            dist_.cleanup(self.env, ok=ok)

    def _stop_requested(self) -> bool:
        """Whether Ctrl-C was pressed (rank 0's word counts, so all ranks stop at the same step)."""
        flag = self._interrupt.requested
        return bool(dist_.broadcast_object(self.env, flag)) if self.env.enabled else flag

    def _fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg, t, st = self.cfg, self.cfg.train, self.state
        main = self.env.is_main
        log_f = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
            _truncate_log(self.run_dir / "log.jsonl", st.step)
            log_f = open(self.run_dir / "log.jsonl", "a")
        n_params = sum(p.numel() for p in self.method.parameters())
        where = f"device {self.device}"
        if self.env.enabled:
            where = (f"{self.env.world_size} ranks ({t.distributed}, {self.env.backend}), micro-batch "
                     f"{self.micro_batch} x {self.accum} accumulation, device {self.device}")
        self.log(f"{cfg.train.method}: {n_params / 1e6:.2f}M parameters, vocab {cfg.model.vocab_size}, "
                 f"L={cfg.data.seq_len}, {len(self.data.train)} train / {len(self.data.val)} val blocks, "
                 f"{where}, precision {self.amp or 'fp32'}")
        budget = t.max_minutes * 60.0 if t.max_minutes > 0 else math.inf
        self.method.train()
        bar = tqdm(total=t.max_steps, initial=st.step, disable=not self.progress, dynamic_ncols=True,
                   unit="step", desc="train", mininterval=0.5 if os.isatty(2) else 30.0)
        tokens_per_step = t.batch_size * cfg.data.seq_len
        window_t, window_tok = time.perf_counter(), 0
        session_start, elapsed0 = time.perf_counter(), st.elapsed
        last_saved = st.step if self.resume_from is not None else -1
        interrupted = False

        def write(rec: dict) -> None:
            if log_f is not None:
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()

        try:
            while st.step < t.max_steps and st.elapsed < budget:
                if self._stop_requested():
                    interrupted = True
                    self.log("interrupted: saving a checkpoint")
                    break
                self.opt.zero_grad(set_to_none=True)
                metrics, gnorm = self._forward_backward()
                if not torch.isfinite(metrics.pop(" objective")):
                    self._bad_step("loss")
                    continue
                if not math.isfinite(gnorm):
                    self._bad_step("gradient")
                    continue
                st.bad_steps = 0
                self.opt.step()
                self.sched.step()
                self.ema.update(self.method, st.step)
                if hasattr(self.method, "on_step_end"):
                    self.method.on_step_end()
                st.step += 1
                st.tokens += tokens_per_step
                window_tok += tokens_per_step
                # Rank 0's clock decides the time budget for everyone.
                elapsed = elapsed0 + time.perf_counter() - session_start
                st.elapsed = float(dist_.broadcast_object(self.env, elapsed)) if budget < math.inf else elapsed
                bar.update(1)
                if st.step % t.log_every == 0 or st.step == t.max_steps:
                    now = time.perf_counter()
                    rec = {"step": st.step, **{k: float(v) for k, v in metrics.items()}, "lr": self.sched.get_last_lr()[0],
                           "grad_norm": gnorm, "tokens_per_s": window_tok / max(now - window_t, 1e-9),
                           "tokens": st.tokens, "elapsed_s": round(st.elapsed, 2)}
                    window_t, window_tok = now, 0
                    write(rec)
                    post = dict(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    if budget < math.inf:  # the step bar's ETA ignores the time budget; show what is left
                        post["time_left"] = time.strftime("%H:%M:%S", time.gmtime(max(0.0, budget - st.elapsed)))
                    bar.set_postfix(post)
                if st.step % t.eval_every == 0:
                    st.last_val = self._evaluate_ranks()
                    write({"step": st.step, **st.last_val})
                    if self.progress:
                        bar.write(f"step {st.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in st.last_val.items()),
                                  file=sys.stderr)  # stdout is kept for the JSON summary
                if st.step % t.save_every == 0:
                    self.save()
                    last_saved = st.step
                if self.on_step is not None:
                    self.on_step(self, metrics)
        finally:
            bar.close()
        has_ckpt = bool(ckpt.list_checkpoints(self.run_dir)) if main else True
        if dist_.broadcast_object(self.env, st.step != last_saved or not has_ckpt):
            if not interrupted:
                st.last_val = self._evaluate_ranks()
                write({"step": st.step, **st.last_val})
            self.save()
        interrupted = interrupted or self._stop_requested()  # Ctrl-C during the final evaluation or save
        if log_f is not None:
            log_f.close()
        summary = {
            "run_dir": str(self.run_dir), "step": st.step, "tokens": st.tokens,
            "train_seconds": round(st.elapsed, 2), "tokens_per_s": round(st.tokens / max(st.elapsed, 1e-9), 1),
            "parameters": n_params, "interrupted": interrupted, "world_size": self.env.world_size,
            "rank": self.env.rank, **st.last_val,
        }
        if main:
            write_json(self.run_dir / "summary.json", summary)
        return summary

    def _bad_step(self, what: str) -> None:
        self.state.bad_steps += 1
        self.opt.zero_grad(set_to_none=True)
        if self.state.bad_steps > self.cfg.train.max_bad_steps:
            raise FmlmError(f"{self.state.bad_steps} non-finite {what} values in a row at step "
                            f"{self.state.step}; lower train.lr or check the data")


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


class _GracefulInterrupt:
    """While training, the first SIGINT only sets ``requested`` (the loop stops at the next step
    boundary and saves); a second one raises KeyboardInterrupt at once. Outside the main thread
    (where Python cannot install signal handlers) Ctrl-C keeps its default behaviour."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.requested = False
        self._installed = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.trainer.log("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop now)")

    def __enter__(self) -> "_GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
