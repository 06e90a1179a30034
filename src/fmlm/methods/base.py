"""What every method is: the :class:`Method` protocol the trainer, the API and the benches rely on."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from fmlm.methods.flm import Strata


@runtime_checkable
class Method(Protocol):
    """A method wraps a backbone (``net``) as an ``nn.Module`` with these members.

    ``loss`` is the training objective of a batch (``strata``: the batch is one part of a global
    batch, see :class:`fmlm.methods.flm.Strata`); ``eval_loss`` gives validation metrics with a
    fixed generator. Generative methods also have ``sample(num_samples, seq_len, steps,
    generator=..., float64=..., ...)`` returning token ids (num_samples, seq_len); a method may
    define ``on_step_end()``, which the trainer calls after every optimiser step.
    """

    def loss(
        self, ids: torch.Tensor, generator: torch.Generator | None = None, strata: Strata | None = None
    ) -> tuple[torch.Tensor, dict]: ...

    def eval_loss(self, ids: torch.Tensor, generator: torch.Generator) -> dict: ...


def nelbo_metrics(nelbo: float) -> dict:
    """Validation metrics of a diffusion NELBO per token: itself and the perplexity bound exp(NELBO)."""
    return {"nelbo": nelbo, "ppl": math.exp(min(nelbo, 700.0))}
