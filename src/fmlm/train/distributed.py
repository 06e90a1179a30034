"""Multi-process training on PyTorch's own engine: ``torchrun`` + DDP or FSDP2.

Launch any training command under ``torchrun`` (single- or multi-node; the usual
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` variables)::

    torchrun --nproc_per_node 8 -m fmlm.cli train owt train.batch_size=512 train.micro_batch_size=16

The process group uses NCCL on GPUs and gloo on CPUs. ``train.distributed``
chooses ``ddp`` (DistributedDataParallel, the default) or ``fsdp`` (FSDP2,
``torch.distributed.fsdp.fully_shard`` per transformer block and on the root).

Without ``WORLD_SIZE`` > 1 in the environment nothing here does anything: the
same code runs as one process.
"""

from __future__ import annotations

import atexit
import datetime
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fmlm.errors import ConfigError


@dataclass
class DistEnv:
    """Where this process stands: rank, world size, local rank, and whether a process group is up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str = "auto") -> tuple[DistEnv, str]:
    """Join the torchrun process group if the environment asks for one.

    Returns the environment and the device name this rank should use (``cuda:LOCAL_RANK``
    on GPUs). Idempotent: an existing default process group is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), device_name
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_name == "auto" or device_name.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        # Long timeout: the other ranks wait in a barrier while rank 0 evaluates or saves.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
        # Whatever way the process ends (an error before fit(), sys.exit, ...), destroy the group while
        # the interpreter is alive: gloo's worker threads outliving it abort the process at exit
        # ("terminate called without an active exception").
        atexit.register(_destroy_quietly)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, enabled=True, backend=backend), device_name


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_object(env: DistEnv, obj):
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(env: DistEnv, obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_metrics(env: DistEnv, sums: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Average per-micro-batch metric sums over micro-batches and ranks (one all-reduce)."""
    keys = sorted(sums)
    vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32).detach().reshape(()) for k in keys])
    if env.enabled:
        dist.all_reduce(vec)  # SUM
    vec = vec / (count * env.world_size)
    return {k: vec[i] for i, k in enumerate(keys)}


def grad_accumulation(global_batch: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) for a fixed global batch.

    ``micro_batch`` 0 means as large as possible (no accumulation). The global batch must be
    a multiple of micro-batch x world size, so every optimiser step sees exactly it.
    """
    if micro_batch <= 0:
        if global_batch % world_size:
            raise ConfigError(
                f"train.batch_size={global_batch} (the global batch) is not divisible by the world size {world_size}"
            )
        micro_batch = global_batch // world_size
    if global_batch % (micro_batch * world_size):
        raise ConfigError(
            f"train.batch_size={global_batch} (the global batch) must be a multiple of "
            f"train.micro_batch_size={micro_batch} x world size {world_size}"
        )
    return micro_batch, global_batch // (micro_batch * world_size)


class LossModule(nn.Module):
    """Makes ``method.loss`` the forward pass, so DDP/FSDP hooks see it."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, ids: torch.Tensor, generator: torch.Generator | None, evaluate: bool = False, strata=None):
        if evaluate:  # through the wrapper too, so FSDP2 gathers the root's parameters
            return self.method.eval_loss(ids, generator)
        return self.method.loss(ids, generator, strata=strata)


def wrap(method: nn.Module, env: DistEnv, kind: str, device: torch.device) -> nn.Module:
    """The module to call for training: ``LossModule(method)``, wrapped in DDP or sharded by FSDP2.

    ``method`` itself stays usable for evaluation, sampling and state dicts (under FSDP2 its
    parameters become sharded DTensors).
    """
    lm = LossModule(method)
    if not env.enabled:
        return lm
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in method.modules():
            # One FSDP unit per transformer block, then the root for everything else.
            if type(m).__name__ in ("DiTBlock", "CausalBlock"):
                fully_shard(m)
        fully_shard(lm)
        return lm
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(lm, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (all but the last)."""
    if sync:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def is_sharded(method: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in method.parameters())


def full_tensor(t):
    """A DTensor's full value (a collective); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(method: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Unsharded model (and optimiser) state for a checkpoint; under FSDP2 a collective whose
    result is complete on rank 0 only."""
    if not is_sharded(method):
        return method.state_dict(), (optimizer.state_dict() if optimizer is not None else None)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(method, options=opts)
    optim = get_optimizer_state_dict(method, optimizer, options=opts) if optimizer is not None else None
    return model, optim


def load_full_state(method: nn.Module, model_state: dict, optimizer=None, optim_state=None) -> None:
    """Inverse of :func:`full_state`: every rank passes the full state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(method, model_state, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(method, optimizer, optim_state_dict=optim_state, options=opts)


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like`` (a DTensor shard, or a plain tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full.to(like.device, like.dtype)


def _destroy_quietly() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - already torn down by a peer's failure
            pass


def cleanup(env: DistEnv, ok: bool = True) -> None:
    """Destroy the process group (every path out of training calls this).

    ``ok``: the ranks are in step (training finished or stopped together), so they first meet in
    a barrier and no rank tears its connections down while a peer still talks to it; after an
    error a peer may be gone, so the group is destroyed at once.
    """
    if not (env.enabled and dist.is_initialized()):
        return
    if ok:
        try:
            dist.barrier()
        except Exception:  # pragma: no cover - a peer died; destroy anyway
            pass
    _destroy_quietly()
