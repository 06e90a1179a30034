"""Methods wrap a backbone with ``loss(ids)``, ``eval_loss(ids)`` and ``sample(...)``.

The training loop and the CLI only talk to this interface, so a new method is one
file plus one line in :func:`build_method`.
"""

from __future__ import annotations

from torch import nn

from fmlm.errors import ConfigError
from fmlm.methods.flm import FLM, euler_sample, stratified_uniform


def _build_flm(cfg) -> nn.Module:
    from fmlm.nn.dit import build_dit
    from fmlm.schedule import make_schedule

    return FLM(build_dit(cfg.model), make_schedule(cfg.train.time, cfg.model.vocab_size), cfg.train.loss)


# method name -> builder(cfg) -> nn.Module. Builders import lazily so that one
# method's dependencies never slow down or break another.
_BUILDERS = {
    "flm": _build_flm,
}
METHODS = tuple(_BUILDERS)


def build_method(cfg) -> nn.Module:
    """Build the method module for a resolved :class:`fmlm.config.RunConfig`."""
    method = cfg.train.method
    if cfg.model.vocab_size < 2 or cfg.model.max_seq_len < 1:
        raise ConfigError("model.vocab_size and model.max_seq_len must be set from the data before building")
    if method not in _BUILDERS:
        raise ConfigError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    return _BUILDERS[method](cfg)


__all__ = ["FLM", "METHODS", "build_method", "euler_sample", "stratified_uniform"]
