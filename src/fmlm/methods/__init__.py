"""Methods wrap a backbone with ``loss(ids)``, ``eval_loss(ids)`` and ``sample(...)``.

The training loop and the CLI only talk to this interface, so a new method is one
file plus one line in :func:`build_method`.
"""

from __future__ import annotations

from torch import nn

from fmlm.errors import ConfigError
from fmlm.methods.flm import FLM, euler_sample, stratified_uniform

METHODS = ("flm",)


def build_method(cfg) -> nn.Module:
    """Build the method module for a resolved :class:`fmlm.config.RunConfig`."""
    from fmlm.nn.dit import build_dit
    from fmlm.schedule import make_schedule

    method = cfg.train.method
    if cfg.model.vocab_size < 2 or cfg.model.max_seq_len < 1:
        raise ConfigError("model.vocab_size and model.max_seq_len must be set from the data before building")
    if method == "flm":
        return FLM(build_dit(cfg.model), make_schedule(cfg.train.time, cfg.model.vocab_size), cfg.train.loss)
    raise ConfigError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")


__all__ = ["FLM", "METHODS", "build_method", "euler_sample", "stratified_uniform"]
