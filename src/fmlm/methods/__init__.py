"""Methods wrap a backbone with ``loss(ids, generator, strata)``, ``eval_loss(ids, generator)`` and ``sample(...)``.

The training loop and the CLI only talk to this interface, so a new method is one
file plus one entry in :mod:`fmlm.methods.registry`. A method may also define
``on_step_end()``, which the trainer calls after every optimiser step (e.g. to update a
target network).
"""

from __future__ import annotations

from fmlm.methods.flm import FLM, euler_sample, stratified_uniform
from fmlm.methods.registry import DISTILLED_BASELINES, METHODS, build_method, load_method

__all__ = ["DISTILLED_BASELINES", "FLM", "METHODS", "build_method", "euler_sample", "load_method", "stratified_uniform"]
