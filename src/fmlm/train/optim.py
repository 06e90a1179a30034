"""The optimiser's companions: the learning-rate schedule (warm-up, then constant or cosine) and the
exponential moving average of the weights (what checkpoints and samples use by default)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fmlm.config import RunConfig


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


class _Shadow(torch.nn.Module):
    """Lets :func:`fmlm.checkpoint.load_into` check EMA weights against the EMA's own keys and shapes."""

    def __init__(self, shadow: dict[str, torch.Tensor]):
        super().__init__()
        self._shadow = shadow

    def state_dict(self, *a, **k):  # type: ignore[override]
        return self._shadow

    def load_state_dict(self, state, strict=True, assign=False):  # type: ignore[override]
        return None  # checked only; EMA.load_state_dict copies


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    """The LR multiplier of step n: linear warm-up, then constant or cosine decay to 0 at max_steps."""
    t = cfg.train

    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        if t.lr_schedule == "cosine":
            progress = min(1.0, step / max(1, t.max_steps))
            return warm * 0.5 * (1 + math.cos(math.pi * progress))
        return warm

    return f
