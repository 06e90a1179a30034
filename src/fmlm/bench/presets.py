"""Bench presets and ablations: which runs a bench trains and how it samples them.

A :class:`BenchPreset` names a base config preset plus overrides shared by every
run (the same data, backbone and token budget for all methods), the extra
overrides of the distillation stage, the step sweep, the number of samples and the
scorer. A :class:`Variant` is one trained model in the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmlm.errors import ConfigError

#: The seed's sampling sweep.
STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
#: The sweep of the distilled discrete baselines (Duo + DCD, MDLM + SDTT).
DISTILLED_STEPS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Variant:
    """One model of a bench.

    Attributes:
        label: name in tables and plots (``FMLM``, ``FLM-uniform``, ...).
        method: ``flm`` | ``semigroup`` | ``lagrangian`` | ``eulerian`` | ``mdlm`` | ``duo`` | ``ar`` |
            ``dcd`` (Duo + DCD) | ``sdtt`` (MDLM + SDTT).
        overrides: ``key=value`` on top of the preset's (and, for distilled models, its distill) overrides.
        teacher: label of the variant a distilled model distils (an FLM for flow maps, Duo for
            ``dcd``, MDLM for ``sdtt``; ``None`` with ``self_distill``).
        self_distill: a flow map trained from scratch on the data, without a teacher.
        steps: the step counts to sample (default: the bench's sweep).
        sample: whether the bench samples it (a teacher only needed for distillation may be skipped).
        curriculum: Duo's Gaussian-relaxation curriculum for this fraction of the training
            steps (``diffusion.curriculum_steps``; an explicit override of that key wins).
    """

    label: str
    method: str
    overrides: tuple[str, ...] = ()
    teacher: str | None = None
    self_distill: bool = False
    steps: tuple[int, ...] | None = None
    sample: bool = True
    curriculum: float = 0.0

    @property
    def distilled(self) -> bool:
        """Trained by distillation (flow maps and the distilled discrete baselines): the distill budget."""
        return self.method in ("semigroup", "lagrangian", "eulerian", "dcd", "sdtt")

    @property
    def flow_map(self) -> bool:
        return self.method in ("semigroup", "lagrangian", "eulerian")


@dataclass(frozen=True)
class BenchPreset:
    name: str
    description: str
    config: str
    overrides: tuple[str, ...]
    distill: tuple[str, ...]
    steps: tuple[int, ...] = STEPS
    num_samples: int = 1024
    scorer: str = "none"
    sample_batch: int = 256
    gpu_recipe: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


#: Duo's reference turns its curriculum on for the first half of training (500k of 1M steps).
DUO_CURRICULUM = 0.5

MAIN = (
    Variant("FLM", "flm"),
    # A flow map is distilled for few steps: its sweep stops at 64, like the distilled baselines'.
    Variant("FMLM", "semigroup", teacher="FLM", steps=DISTILLED_STEPS),
    Variant("MDLM", "mdlm"),
    Variant("Duo", "duo", curriculum=DUO_CURRICULUM),
    # The distilled discrete baselines, on the flow map's distillation budget (the preset's distill
    # overrides); their own sweep stops at 64 steps, past the few-step regime they are distilled for.
    Variant("Duo+DCD", "dcd", teacher="Duo", steps=DISTILLED_STEPS),
    Variant("MDLM+SDTT", "sdtt", teacher="MDLM", steps=DISTILLED_STEPS),
    Variant("AR", "ar"),
)

_PAPER_NOTES = (
    "Stage 1 as in METHOD.md §5: AdamW lr 3e-4, 2,500 warm-up steps, EMA 0.9999, dropout 0.1, ~1M steps.",
    "Distillation: AdamW lr 3e-4, beta2 0.95 (METHOD.md §4); 100k steps is this bench's choice.",
    "Scorer gpt2-large needs the Hugging Face Hub (or a local copy: scorer=DIR).",
)

PRESETS: dict[str, BenchPreset] = {
    "tiny": BenchPreset(
        "tiny",
        "smoke test: the tiny phrases task, seconds",
        "tiny",
        ("max_steps=30", "eval_every=1000", "save_every=1000"),
        ("max_steps=20",),
        steps=(1, 2, 4),
        num_samples=64,
        scorer="none",
        sample_batch=64,
    ),
    "phrases": BenchPreset(
        "phrases",
        "phrases task n=6 phrases of k=3 words, L=3: exact valid rate and coverage; minutes",
        "phrases",
        ("phrases_n=6", "phrases_k=3", "phrases_per_seq=1", "seq_len=3", "max_steps=1000", "max_minutes=0"),
        ("max_steps=12000", "distill.boundary_fraction=0.25"),
        num_samples=1024,
        scorer="none",
        sample_batch=256,
        notes=(
            "Stage 1 (FLM, MDLM, Duo, AR): 1,000 steps of batch 128, the same token budget for all.",
            "FMLM: semigroup distillation of the FLM, 12,000 steps, a quarter of the off-diagonal pairs "
            "at (s, t) = (0, 1).",
            "Duo+DCD (of the Duo) and MDLM+SDTT (of the MDLM): the same distillation budget and optimiser as "
            "FMLM, in 6 rounds of step halving from 64 steps.",
        ),
    ),
    "shakespeare-cpu": BenchPreset(
        "shakespeare-cpu",
        "the embedded Shakespeare corpus, characters, L=128, mini DiT; about 2 h 20 min "
        "on 2 CPU cores (measured: 44 min training, 92 min sampling and Gemma scoring)",
        "shakespeare",
        ("model.size=mini", "batch_size=32", "max_steps=1500", "max_minutes=0", "eval_every=500", "save_every=500"),
        ("max_steps=800",),
        num_samples=128,
        scorer="gemma-3-270m",
        sample_batch=128,
    ),
    "lm1b-cpu": BenchPreset(
        "lm1b-cpu",
        "LM1B (the Hugging Face dataset, or local files with data.dataset=lm1b:PATH), "
        "bert-base-uncased, L=128, mini DiT; about 60-90 min on 2 CPU cores (estimate, not run at full size)",
        "lm1b",
        (
            "model.size=mini",
            "dropout=0",
            "batch_size=16",
            "lr=1e-3",
            "warmup_steps=100",
            "max_steps=400",
            "ema=0.99",
            "eval_every=200",
            "save_every=200",
            "log_every=20",
        ),
        ("max_steps=200",),
        num_samples=64,
        scorer="gemma-3-270m",
        sample_batch=64,
    ),
    "lm1b": BenchPreset(
        "lm1b",
        "paper recipe (METHOD.md §5): LM1B, bert-base-uncased, L=128, DiT-small 12x768, batch 512, 1M steps; a GPU job",
        "lm1b",
        (),
        ("max_steps=100000",),
        num_samples=1024,
        scorer="gpt2-large",
        sample_batch=256,
        gpu_recipe=True,
        notes=_PAPER_NOTES,
    ),
    "owt": BenchPreset(
        "owt",
        "paper recipe (METHOD.md §5): OpenWebText, GPT-2 tokenizer, L=1024, DiT-small, batch 512, 1M steps; a GPU job",
        "owt",
        (),
        ("max_steps=100000",),
        num_samples=1024,
        scorer="gpt2-large",
        sample_batch=64,
        gpu_recipe=True,
        notes=_PAPER_NOTES,
    ),
}

ABLATIONS: dict[str, tuple[str, tuple[Variant, ...]]] = {
    "loss": (
        "CE denoiser vs MSE denoiser vs MSE velocity (FLM)",
        (
            Variant("FLM", "flm"),  # loss=ce: the same run as the main bench's FLM
            Variant("FLM-mse_denoiser", "flm", ("loss=mse_denoiser",)),
            Variant("FLM-mse_velocity", "flm", ("loss=mse_velocity",)),
        ),
    ),
    "time": (
        "decoding-error time τ vs uniform t (FLM)",
        (
            Variant("FLM", "flm"),
            Variant("FLM-uniform", "flm", ("time=uniform",)),
        ),
    ),
    "recipe": (
        "the DiT's small-scale recipe for the FLM, one change at a time: τ into the time embedding "
        "unscaled (the authors'), a zero-initialised output layer (the authors'), the input embedding's "
        "initial scale, LayerNorm gains, learned absolute positions",
        (
            Variant("FLM", "flm", steps=(32,)),
            Variant("FLM-time-scale-1", "flm", ("model.time_scale=1",), steps=(32,)),
            Variant("FLM-zero-out", "flm", ("model.zero_out=true",), steps=(32,)),
            Variant("FLM-embed-std-1", "flm", ("model.embed_std=1",), steps=(32,)),
            Variant("FLM-ln-gains", "flm", ("model.norm_affine=true",), steps=(32,)),
            Variant("FLM-abs-pos", "flm", ("model.position_embedding=true",), steps=(32,)),
        ),
    ),
    "distill": (
        "semigroup vs Lagrangian vs Eulerian vs self-distilled semigroup, 1-8 steps",
        (
            Variant("FLM", "flm", steps=(1, 2, 4, 8)),
            Variant("FMLM", "semigroup", teacher="FLM", steps=(1, 2, 4, 8)),
            Variant("FMLM-lagrangian", "lagrangian", teacher="FLM", steps=(1, 2, 4, 8)),
            Variant("FMLM-eulerian", "eulerian", teacher="FLM", steps=(1, 2, 4, 8)),
            Variant("FMLM-self", "semigroup", self_distill=True, steps=(1, 2, 4, 8)),
        ),
    ),
}


def get_preset(name: str) -> BenchPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown bench preset {name!r} (choose from {', '.join(PRESETS)}, or `train`)")
    return PRESETS[name]


def variants_for(ablation: str | None) -> tuple[Variant, ...]:
    if ablation is None:
        return MAIN
    if ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation {ablation!r} (choose from {', '.join(ABLATIONS)})")
    return ABLATIONS[ablation][1]
