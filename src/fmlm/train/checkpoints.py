"""Checkpoints of a training run: find the newest valid one, restore a trainer from it, save one."""

from __future__ import annotations

import warnings
from pathlib import Path

import fmlm.train.distributed as dist_
from fmlm import checkpoint as ckpt
from fmlm.errors import CheckpointError, FmlmError
from fmlm.train.optim import _Shadow
from fmlm.train.state import TrainState, _free_space_note, rng_state, set_rng_state


def find_resume_point(run_dir: Path) -> Path | None:
    """The newest valid checkpoint; an error (changing nothing) if there are checkpoints but none is valid."""
    found, skipped = ckpt.newest_valid(run_dir, deep=True)
    if found is not None:
        for why in skipped:
            warnings.warn(f"skipping {why}", stacklevel=4)
    elif skipped:
        n = len(skipped)
        raise CheckpointError(
            f"none of the {n} checkpoint{'s' * (n > 1)} in {run_dir / 'checkpoints'} is valid (newest: "
            f"{skipped[0]}); nothing was changed: rerun with --restart to start over (the old log and "
            "checkpoints are archived), or use another --run-dir"
        )
    return found


def restore(trainer, path: Path) -> None:
    """Load a checkpoint's weights, EMA, optimiser, scheduler, RNG and counters into ``trainer`` (exact resume)."""
    ckpt.verify(path, deep=True)
    weights = ckpt.load_state(path, "model.safetensors")
    ema = ckpt.load_state(path, "ema.safetensors")
    opt = ckpt.load_training_state(path, ckpt.OPTIMIZER)  # no pickle: tensors and plain containers
    rng = ckpt.load_training_state(path, ckpt.RNG)
    state = TrainState.from_dict(ckpt.read_json(path / "trainer_state.json"), path / "trainer_state.json")
    try:
        if not isinstance(opt, dict) or not isinstance(rng, dict):
            raise ValueError("not a state dictionary")
        if trainer.sharded:
            dist_.load_full_state(trainer.method, weights, trainer.opt, opt["optimizer"])
            for k, v in ema.items():
                trainer.ema.shadow[k] = dist_.shard_like(v.float(), trainer.ema.shadow[k])
        else:
            ckpt.load_into(trainer.method, weights, "checkpoint weights")
            ckpt.load_into(_Shadow(trainer.ema.shadow), ema, "checkpoint EMA weights")
            trainer.ema.load_state_dict(ema)
            trainer.opt.load_state_dict(opt["optimizer"])
        trainer.sched.load_state_dict(opt["scheduler"])
        set_rng_state(rng, trainer.gen, trainer.env)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {msg[:200]}") from None
    trainer.state = state
    trainer.log(f"resumed from {path} at step {trainer.state.step}")


def init_weights(method, source: str, log) -> Path:
    """Load the EMA weights of another run's checkpoint into a fresh run's ``method`` (``train.init_from``).

    Strict: the checkpoint must hold the same method and backbone (one-line error otherwise).
    The optimiser, schedule, RNG and counters are not taken: the new run starts at step 0.
    """
    path = ckpt.resolve(source)
    ckpt.verify(path, deep=True)
    ckpt.load_into(method, ckpt.load_state(path, "ema.safetensors"), f"train.init_from={source}")
    log(f"initialised from the EMA weights of {path}")
    return path


def save(trainer) -> Path:
    """Write a checkpoint (rank 0; under FSDP every rank helps gather the state).

    A failure to write (disk full, read-only folder) is one line (FmlmError) on every rank;
    the checkpoints already on disk are untouched.
    """
    path = trainer.run_dir / "checkpoints" / f"{ckpt.PREFIX}{trainer.state.step:08d}"
    model_state, optim_state = dist_.full_state(trainer.method, trainer.opt)
    ema_state = {k: dist_.full_tensor(v) for k, v in trainer.ema.state_dict().items()}
    rng = rng_state(trainer.gen, trainer.env)
    problem = None
    if trainer.env.is_main:
        try:
            ckpt.save_checkpoint(
                path,
                trainer.cfg.to_dict(),
                model_state,
                tokenizer=trainer.data.tokenizer,
                ema_state=ema_state,
                optimizer_state={"optimizer": optim_state, "scheduler": trainer.sched.state_dict()},
                trainer_state=trainer.state.__dict__,
                rng_state=rng,
            )
            ckpt.prune(trainer.run_dir, trainer.cfg.train.keep_last)
        except OSError as e:
            problem = (
                f"cannot write checkpoint {path}: {e.strerror or e}{_free_space_note(path.parent)}; "
                "the checkpoints already saved are intact"
            )
    problem = dist_.broadcast_object(trainer.env, problem)  # also the barrier after the save
    if problem is not None:
        raise FmlmError(problem)
    return path
