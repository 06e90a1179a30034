"""Run configuration: dataclasses (:mod:`.sections`), presets (:mod:`fmlm.presets`), ``key=value``
overrides (:mod:`.overrides`) and checks (:mod:`.checks`).

A run is fully described by a :class:`RunConfig`, made of four sections
(``model``, ``data``, ``train``, ``sample``). It is built from a named preset
(or a TOML file) plus command-line overrides, and saved as ``config.json`` in
the run directory and in every checkpoint, so any run can be reproduced and
any checkpoint rebuilt without the command that made it.

Overrides are ``section.key=value`` (``train.lr=1e-3``) or just ``key=value``
when the key name exists in one section only (``lr=1e-3``, ``loss=mse_denoiser``,
``time=uniform``). ``model.size=NAME`` fills every backbone dimension from
:data:`MODEL_SIZES`; later overrides of single dimensions still win.
"""

from fmlm.config.checks import LOSSES, LR_SCHEDULES, PACKINGS, PRECISIONS, TIMES, validate
from fmlm.config.overrides import build_config, parse_overrides, set_value
from fmlm.config.sections import (
    SECTIONS,
    ClassifierConfig,
    DataConfig,
    DiffusionConfig,
    DistillConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    flatten,
)
from fmlm.presets import DEFAULT_PRESET, MODEL_SIZES, PRESETS
