"""Method name -> method module: :func:`build_method` for a config, :func:`load_method` for a checkpoint.

A new method is one file in :mod:`fmlm.methods` plus one entry in ``_BUILDERS``. Distillation
teachers are loaded here too (from checkpoints, strictly), so nothing below the API layer
needs :func:`fmlm.api.load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fmlm.errors import CheckpointError, ConfigError
from fmlm.methods.flm import FLM

if TYPE_CHECKING:
    from fmlm.config import RunConfig
    from fmlm.data.tokenizers import Tokenizer


def _build_flm(cfg, training: bool = False) -> nn.Module:
    from fmlm.nn.dit import build_dit
    from fmlm.schedule import make_schedule

    if cfg.model.two_time:
        raise ConfigError("FLM uses a one-time backbone; set model.two_time=false")
    return FLM(
        build_dit(cfg.model, given_embedding=_given(cfg)),
        make_schedule(cfg.train.time, cfg.model.vocab_size),
        cfg.train.loss,
        noise=_noise(cfg, training),
        cond=_cond(cfg),
    )


def _given(cfg) -> bool:
    """Whether the backbone has a given embedding: only for a run trained with conditioning."""
    return cfg.train.cond_prob > 0


def _cond(cfg):
    from fmlm.conditioning import Conditioning

    return Conditioning.from_config(cfg.train)


def _noise(cfg, training: bool) -> str:
    """The noise path of FLM-type losses: ``train.noise`` when training; a loaded model's validation
    metrics (``fmlm eval``, the benches) use the reference V-space noise, whichever path trained it."""
    return cfg.train.noise if training else "vocab"


def load_teacher(path: str, cfg: RunConfig) -> FLM:
    """Load a frozen FLM teacher and check that it fits the student's data and vocabulary."""
    tcfg, method, _, _ = load_method(path, device="cpu")
    if tcfg.train.method != "flm":
        raise ConfigError(f"the teacher must be an FLM checkpoint, got method {tcfg.train.method!r}: {path}")
    if tcfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"teacher vocabulary ({tcfg.model.vocab_size}) differs from the data's ({cfg.model.vocab_size})"
        )
    if tcfg.model.max_seq_len != cfg.model.max_seq_len:
        raise ConfigError(
            f"teacher sequence length ({tcfg.model.max_seq_len}) differs from the student's ({cfg.model.max_seq_len})"
        )
    if tcfg.train.time != cfg.train.time:
        raise ConfigError(f"teacher time reparameterisation ({tcfg.train.time}) differs from {cfg.train.time}")
    if _given(tcfg) != _given(cfg):
        raise ConfigError(
            "a flow map trained with conditioning (train.cond_prob > 0) needs a teacher trained with it, and "
            f"only then: the teacher has train.cond_prob={tcfg.train.cond_prob}, the student {cfg.train.cond_prob}"
        )
    return method


def _build_fmlm(cfg, training: bool = False) -> nn.Module:
    """Flow map LM; when training from a teacher, the student starts as a copy of it."""
    import dataclasses

    from fmlm.methods.flow_map import FMLM
    from fmlm.nn.dit import build_dit
    from fmlm.schedule import make_schedule

    d = cfg.distill
    net = build_dit(dataclasses.replace(cfg.model, two_time=True), given_embedding=_given(cfg))
    kw = dict(
        cond=_cond(cfg),
        objective=cfg.train.method,
        diag_fraction=d.diag_fraction,
        boundary_fraction=d.boundary_fraction,
        mid=d.mid,
        target_ema=d.target_ema,
        projection=d.projection,
        eulerian_loss=d.eulerian_loss,
        max_gap=d.max_gap,
        eulerian_form=d.eulerian_form,
        noise=_noise(cfg, training),
    )
    if training and not d.self_distill:
        if not d.teacher:
            raise ConfigError(
                f"method {cfg.train.method!r} distils an FLM: use `fmlm distill --teacher RUN` or `fmlm distill --self`"
            )
        return FMLM.from_teacher(load_teacher(d.teacher, cfg), net, **kw)
    return FMLM(net, make_schedule(cfg.train.time, cfg.model.vocab_size), **kw)


def _build_ar(cfg, training: bool = False) -> nn.Module:
    from fmlm.methods.ar import AR
    from fmlm.nn.causal import build_causal

    return AR(build_causal(cfg.model))


def _build_mdlm(cfg, training: bool = False) -> nn.Module:
    import dataclasses

    from fmlm.methods.mdlm import MDLM
    from fmlm.nn.dit import build_dit

    # One extra input/output slot: id V is the mask token; one time input. MDLM adds its own
    # absolute positions unless the backbone has them (model.position_embedding, every method).
    return MDLM(
        build_dit(
            dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size + 1, two_time=False),
            given_embedding=_given(cfg),
        ),
        t_min=cfg.diffusion.t_min,
        time_conditioning=cfg.diffusion.mdlm_time_conditioning,
        position_embedding=not cfg.model.position_embedding,
        cond=_cond(cfg),
    )


def _build_duo(cfg, training: bool = False) -> nn.Module:
    import dataclasses

    from fmlm.methods.duo import Duo
    from fmlm.nn.dit import build_dit

    dc = cfg.diffusion
    return Duo(
        build_dit(dataclasses.replace(cfg.model, two_time=False), given_embedding=_given(cfg)),
        t_min=dc.t_min,
        greedy_tail=dc.greedy_tail,
        greedy_of=dc.greedy_of,
        curriculum_steps=dc.curriculum_steps,
        cond=_cond(cfg),
    )


#: Distilled discrete baselines: method -> the method its teacher must be.
DISTILLED_BASELINES = {"dcd": "duo", "sdtt": "mdlm"}


def load_discrete_teacher(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The EMA weights of the Duo/MDLM teacher of a ``dcd``/``sdtt`` run, checked against the student's config."""
    from fmlm import checkpoint as ckpt
    from fmlm.config import RunConfig

    want, path = DISTILLED_BASELINES[cfg.train.method], cfg.distill.teacher
    if not path:
        raise ConfigError(
            f"method {cfg.train.method!r} distils a {want} run: use `fmlm distill --teacher RUN "
            f"method={cfg.train.method}`"
        )
    p = ckpt.resolve(path)
    ckpt.verify(p, deep=True)
    tcfg = RunConfig.from_dict(ckpt.read_json(p / "config.json"))
    if tcfg.train.method != want:
        raise ConfigError(
            f"method {cfg.train.method!r} needs a {want} teacher, got a {tcfg.train.method} checkpoint: {path}"
        )
    for name, a, b in (
        ("vocabulary", tcfg.model.vocab_size, cfg.model.vocab_size),
        ("sequence length", tcfg.model.max_seq_len, cfg.model.max_seq_len),
        ("diffusion.t_min", tcfg.diffusion.t_min, cfg.diffusion.t_min),
    ):
        if a != b:
            raise ConfigError(f"teacher {name} ({a}) differs from the student's ({b}): {path}")
    name = "ema.safetensors" if (p / "ema.safetensors").is_file() else "model.safetensors"
    return ckpt.load_state(p, name)


def _build_distilled_baseline(cfg, training: bool = False) -> nn.Module:
    """Duo + DCD or MDLM + SDTT: the undistilled method's student with a frozen teacher copy."""
    import dataclasses
    import math

    from fmlm.nn.dit import build_dit

    d, dc = cfg.distill, cfg.diffusion
    kw = dict(
        rounds=d.rounds,
        base_steps=d.base_steps,
        teacher_steps=d.teacher_steps,
        round_steps=max(1, math.ceil(cfg.train.max_steps / d.rounds)),
        kind=d.divergence,
    )
    if cfg.train.method == "dcd":
        from fmlm.methods.dcd import DCD

        method = DCD(
            build_dit(dataclasses.replace(cfg.model, two_time=False)),
            t_min=dc.t_min,
            greedy_tail=dc.greedy_tail,
            greedy_of=dc.greedy_of,
            **kw,
        )
    else:
        from fmlm.methods.sdtt import SDTT

        method = SDTT(
            build_dit(dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size + 1, two_time=False)),
            t_min=dc.t_min,
            time_conditioning=dc.mdlm_time_conditioning,
            **kw,
        )
    if training:
        try:
            method.load_student(load_discrete_teacher(cfg))
        except KeyError as e:
            raise CheckpointError(f"teacher {cfg.distill.teacher} does not match the student: {e.args[0]}") from None
    return method


def _build_classifier(cfg, training: bool = False) -> nn.Module:
    """Reward classifier over soft sequences; its labels are derived from the text (label=, keyword=)."""
    import dataclasses
    import functools

    from fmlm.methods.classifier import Classifier, make_labeller, num_classes
    from fmlm.nn.dit import build_dit

    return Classifier(
        build_dit(dataclasses.replace(cfg.model, two_time=False)),
        num_classes(cfg),
        cfg.classifier.soft_fraction,
        functools.partial(make_labeller, cfg),
    )


# method name -> builder(cfg) -> nn.Module. Builders import lazily so that one
# method's dependencies never slow down or break another.
_BUILDERS = {
    "flm": _build_flm,
    "semigroup": _build_fmlm,
    "lagrangian": _build_fmlm,
    "eulerian": _build_fmlm,
    "ar": _build_ar,
    "mdlm": _build_mdlm,
    "duo": _build_duo,
    "dcd": _build_distilled_baseline,
    "sdtt": _build_distilled_baseline,
    "classifier": _build_classifier,
}
METHODS = tuple(_BUILDERS)


def build_method(cfg: RunConfig, training: bool = False) -> nn.Module:
    """Build the method module for a resolved :class:`fmlm.config.RunConfig`.

    ``training=True`` also builds what only training needs (e.g. a distillation teacher).
    """
    method = cfg.train.method
    if cfg.model.vocab_size < 2 or cfg.model.max_seq_len < 1:
        raise ConfigError("model.vocab_size and model.max_seq_len must be set from the data before building")
    if method not in _BUILDERS:
        raise ConfigError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    return _BUILDERS[method](cfg, training)


def load_method(
    path: str | Path, device: str | torch.device = "cpu", ema: bool = True, tokenizer: Tokenizer | None = None
) -> tuple[RunConfig, nn.Module, Tokenizer, Path]:
    """A checkpoint's (config, method in eval mode on ``device``, tokenizer, checkpoint directory).

    ``path`` is a checkpoint directory or a run directory (its newest checkpoint that passes the
    deep check). Strict: a missing or corrupt file, a weight of the wrong shape or a tokenizer
    whose vocabulary differs from the model's raises :class:`fmlm.errors.CheckpointError`.
    ``ema``: the EMA weights when the checkpoint has them. ``tokenizer`` replaces the saved one.
    """
    from fmlm import checkpoint as ckpt
    from fmlm.config import RunConfig
    from fmlm.data import load_tokenizer

    p = ckpt.resolve(path, deep=True)  # a run directory: its newest checkpoint that passes the deep check
    if p == Path(path):  # named directly: not checked yet
        ckpt.verify(p, deep=True)
    cfg = RunConfig.from_dict(ckpt.read_json(p / "config.json"))
    tok = tokenizer if tokenizer is not None else load_tokenizer(p / "tokenizer")
    if tok.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(
            f"tokenizer vocabulary ({tok.vocab_size}) does not match the checkpoint's ({cfg.model.vocab_size})"
        )
    method = build_method(cfg)
    name = "ema.safetensors" if ema and (p / "ema.safetensors").is_file() else "model.safetensors"
    ckpt.load_into(method, ckpt.load_state(p, name), f"{p / name}")
    method.to(device).eval()
    return cfg, method, tok, p
