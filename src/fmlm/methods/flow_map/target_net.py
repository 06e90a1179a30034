"""The flow map's EMA target network: its update after each step and its place in the student's state dict (keys
``target.*``)."""

from __future__ import annotations

import torch


def _save_target(module, state_dict, prefix, local_metadata):
    for k, v in module._target.state_dict().items():
        state_dict[f"{prefix}target.{k}"] = v.detach()


def _load_target(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    head = f"{prefix}target."
    own = {k[len(head) :]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(head)]}
    if not own:
        # Older checkpoints (or a student saved without a target): start the target from the student.
        own = {k[len(f"{prefix}net.") :]: v for k, v in state_dict.items() if k.startswith(f"{prefix}net.")}
    missing, unexpected = module._target.load_state_dict(own, strict=False)
    missing_keys.extend(f"{head}{k}" for k in missing)
    unexpected_keys.extend(f"{head}{k}" for k in unexpected)


@torch.no_grad()
def update_target(target: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """target ← decay·target + (1 − decay)·net, parameter by parameter.

    Under FSDP2 the student's parameters are shards (DTensors) while the target copy is whole,
    so each shard is gathered first.
    """
    for p_t, p in zip(target.parameters(), net.parameters()):
        p = p.detach()
        if hasattr(p, "full_tensor"):
            p = p.full_tensor()
        p_t.lerp_(p, 1 - decay)
