"""Building a :class:`RunConfig` from a preset (or a TOML file) and ``key=value`` overrides, with types checked."""

from __future__ import annotations

import copy
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from fmlm.config.checks import validate
from fmlm.config.sections import SECTIONS, RunConfig, _coerce, _field_type
from fmlm.errors import ConfigError
from fmlm.presets import DEFAULT_PRESET, MODEL_SIZES, PRESETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


def _section_keys(cfg: RunConfig) -> dict[str, list[str]]:
    """Map each bare key name to the sections that define it (for short ``key=value``)."""
    out: dict[str, list[str]] = {}
    for sec in SECTIONS:
        for f in fields(getattr(cfg, sec)):
            out.setdefault(f.name, []).append(sec)
    return out


# Bare keys that exist in several sections resolve to the section users mean most often.
_PREFERRED = {"seed": "train", "steps": "sample"}


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    """Apply one override ``key = value`` to ``cfg`` in place."""
    if "." in key:
        sec, name = key.split(".", 1)
        if sec not in SECTIONS:
            raise ConfigError(f"unknown config key {key!r} (sections: {', '.join(SECTIONS)})")
        section = getattr(cfg, sec)
        if name not in {f.name for f in fields(section)}:
            raise ConfigError(f"unknown config key {key!r}")
    else:
        owners = _section_keys(cfg).get(key)
        if not owners:
            raise ConfigError(f"unknown config key {key!r}")
        if len(owners) > 1 and key not in _PREFERRED:
            raise ConfigError(f"ambiguous key {key!r}: write one of " + ", ".join(f"{s}.{key}" for s in owners))
        sec, name = (_PREFERRED[key] if len(owners) > 1 else owners[0]), key
        section = getattr(cfg, sec)
    if sec == "model" and name == "size":
        if value not in MODEL_SIZES:
            raise ConfigError(f"unknown model size {value!r} (choose from {', '.join(MODEL_SIZES)})")
        for k, v in MODEL_SIZES[value].items():
            setattr(cfg.model, k, v)
    setattr(section, name, _coerce(value, _field_type(section, name), f"{sec}.{name}"))


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        if not k:
            raise ConfigError(f"expected key=value, got {item!r}")
        out.append((k.strip(), v))
    return out


def build_config(preset: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from a preset name or a TOML file, then apply ``key=value`` overrides.

    A TOML file has the same sections as ``config.json`` and may name a base preset
    with a top-level ``preset = "phrases"``.
    """
    preset = preset or DEFAULT_PRESET
    cfg = RunConfig()
    path = Path(preset)
    if preset.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {preset}")
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot parse {preset}: {e}") from None
        base = data.pop("preset", None)
        if base is not None:
            cfg = build_config(str(base))
        for sec, values in data.items():
            if sec not in SECTIONS or not isinstance(values, dict):
                raise ConfigError(f"unknown config section {sec!r} in {preset}")
            for k, v in values.items():
                set_value(cfg, f"{sec}.{k}", v)
        cfg.preset = path.stem
    else:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)} or a .toml file)")
        for sec, values in copy.deepcopy(PRESETS[preset]).items():
            for k, v in values.items():
                set_value(cfg, f"{sec}.{k}", v)
        cfg.preset = preset
    for k, v in parse_overrides(overrides or []):
        set_value(cfg, k, v)
    validate(cfg)
    return cfg
