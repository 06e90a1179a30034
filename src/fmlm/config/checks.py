"""The checks of a resolved configuration: every value in range, every choice known (one line per problem,
ConfigError)."""

from __future__ import annotations

import math
from dataclasses import fields

from fmlm.config.sections import SECTIONS, RunConfig
from fmlm.errors import ConfigError

LOSSES = ("ce", "mse_denoiser", "mse_velocity")


TIMES = ("decoding_error", "uniform")


PACKINGS = ("wrap", "pad")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


LR_SCHEDULES = ("constant", "cosine")


LOG_WRITERS = ("jsonl", "tensorboard", "wandb")


def parse_log_to(text: str) -> list[str]:
    """``train.log_to`` ("jsonl,tensorboard") -> ["jsonl", "tensorboard"]; ConfigError for an empty or unknown name."""
    names = [n.strip() for n in str(text).split(",")]
    if any(not n for n in names):
        raise ConfigError(f"train.log_to must be a comma list of {', '.join(LOG_WRITERS)}, got {text!r}")
    bad = [n for n in names if n not in LOG_WRITERS]
    if bad:
        raise ConfigError(f"train.log_to: unknown writer {bad[0]!r} (choose from {', '.join(LOG_WRITERS)})")
    return list(dict.fromkeys(names))


def validate(cfg: RunConfig) -> None:
    """Reject values that would fail later with a less clear message."""
    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.sample
    parse_log_to(t.log_to)

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
    if m.attn_softcap < 0:
        raise ConfigError(f"model.attn_softcap must be >= 0 (0: off), got {m.attn_softcap}")
    for name in ("time_scale", "embed_std", "norm_eps"):
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
    if t.method in ("dcd", "sdtt") and cfg.distill.teacher_steps**cfg.distill.rounds > cfg.distill.base_steps:
        raise ConfigError(
            f"distill.rounds={cfg.distill.rounds} rounds that divide the steps by "
            f"{cfg.distill.teacher_steps} from distill.base_steps={cfg.distill.base_steps} end "
            "below one step"
        )
    if not 0.0 < cfg.diffusion.t_min < 1.0:
        raise ConfigError(f"diffusion.t_min must be in (0, 1), got {cfg.diffusion.t_min}")
    if cfg.diffusion.curriculum_steps < 0:
        raise ConfigError(f"diffusion.curriculum_steps must be >= 0, got {cfg.diffusion.curriculum_steps}")
    choice("classifier.label", cfg.classifier.label, ("phrase", "keyword"))
    dc = cfg.distill
    for name, v in (
        ("distill.diag_fraction", dc.diag_fraction),
        ("distill.boundary_fraction", dc.boundary_fraction),
        ("distill.target_ema", dc.target_ema),
        ("sample.gamma", s.gamma),
        ("classifier.soft_fraction", cfg.classifier.soft_fraction),
        ("train.cond_prob", t.cond_prob),
        ("train.cond_infill_prob", t.cond_infill_prob),
        ("train.cfg_drop", t.cfg_drop),
    ):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {v}")
    _check_conditioning(t)
    if not 0.0 < dc.max_gap <= 1.0:
        raise ConfigError(f"distill.max_gap must be in (0, 1], got {dc.max_gap}")
    if dc.diag_fraction >= 1.0 and t.method in ("semigroup", "lagrangian", "eulerian"):
        raise ConfigError("distill.diag_fraction must be < 1 for flow-map distillation")
    positive = {
        "model.n_layers": m.n_layers,
        "model.d_model": m.d_model,
        "model.n_heads": m.n_heads,
        "model.cond_dim": m.cond_dim,
        "data.seq_len": d.seq_len,
        "train.batch_size": t.batch_size,
        "train.max_steps": t.max_steps,
        "train.log_every": t.log_every,
        "train.eval_every": t.eval_every,
        "train.save_every": t.save_every,
        "train.keep_last": t.keep_last,
        "sample.steps": s.steps,
        "sample.num_samples": s.num_samples,
        "train.eval_batches": t.eval_batches,
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


#: Methods whose training takes ``train.cond_prob`` > 0 (:mod:`fmlm.conditioning`).
CONDITIONED_METHODS = ("flm", "semigroup", "lagrangian", "eulerian", "mdlm", "duo")


def _check_conditioning(t) -> None:
    if (t.cond_infill_prob or t.cfg_drop) and not t.cond_prob:
        raise ConfigError("train.cond_infill_prob and train.cfg_drop need train.cond_prob > 0")
    names = t.method.split("+")  # the two-stage main job: flm+semigroup
    if t.cond_prob and any(n not in CONDITIONED_METHODS for n in names):
        raise ConfigError(f"train.cond_prob applies to methods {', '.join(CONDITIONED_METHODS)}, not {t.method!r}")
