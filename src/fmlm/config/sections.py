"""The sections of a run configuration (dataclasses) and :class:`RunConfig`, which holds them."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fmlm.errors import ConfigError


@dataclass
class ModelConfig:
    """Backbone hyper-parameters. ``vocab_size`` and ``max_seq_len`` are filled from the data.

    The DiT's small-scale recipe (defaults: this library's original network):
    ``time_scale`` multiplies τ ∈ [0, 1] before the sinusoidal features (the flm authors
    feed τ itself: 1); ``zero_out`` zero-initialises the output layer (the authors'
    choice); ``embed_std`` is the input embedding's initial standard deviation;
    ``norm_affine`` gives every LayerNorm a learned gain and bias; ``position_embedding``
    adds a learned absolute position embedding to the input of every method that uses the
    DiT (MDLM otherwise adds its own, see :mod:`fmlm.methods.mdlm`). ``norm_eps`` and
    ``attn_softcap`` (a soft cap on the attention logits, 0: off) are the authors' 1e-5 and 50 in
    a model imported from their checkpoints (``fmlm import flm-official``).
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
    norm_eps: float = 1e-6
    attn_softcap: float = 0.0
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
    reference: V-dimensional noise through the input layer). ``log_to`` is a comma list of the
    log writers, ``jsonl``, ``tensorboard``, ``wandb`` (:mod:`fmlm.train.logs`).

    Conditioning (:mod:`fmlm.conditioning`; FLM, flow maps, MDLM, Duo): ``cond_prob`` of the rows
    get given positions (a clean prefix, or with ``cond_infill_prob`` random spans) that carry no
    loss and are flagged by a learned given embedding (0: none, and no such embedding);
    ``cfg_drop`` drops a conditioned row's conditioning (classifier-free guidance).

    ``init_from`` (a run or checkpoint directory of the same method and backbone) starts a new
    run from that checkpoint's EMA weights, with a fresh optimiser, schedule and step count:
    fine-tuning, or a second phase with another learning rate or EMA (ignored on resume).
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
    log_to: str = "jsonl"  # comma list of jsonl, tensorboard, wandb (fmlm.train.logs)
    cond_prob: float = 0.0
    cond_infill_prob: float = 0.0
    cfg_drop: float = 0.0
    init_from: str = ""


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
    default) or ``direct`` (D_s + c·J as written in METHOD.md; see fmlm.methods.flow_map).
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


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


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
