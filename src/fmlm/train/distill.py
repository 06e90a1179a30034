"""The configuration of a distillation run (``fmlm distill``): stage 2 from an FLM teacher (a flow map),
from a Duo / MDLM teacher (DCD / SDTT), or self-distillation from scratch."""

from __future__ import annotations

from fmlm import checkpoint as ckpt
from fmlm.config import RunConfig, build_config, set_value, validate
from fmlm.data import Tokenizer, load_tokenizer
from fmlm.errors import ConfigError
from fmlm.methods.flow_map import OBJECTIVES
from fmlm.methods.registry import DISTILLED_BASELINES


def apply_distill_defaults(
    cfg: RunConfig,
    overrides: list[str],
    teacher_method: str = "flm",
    self_distill: bool = False,
    teacher_given: bool = True,
) -> RunConfig:
    """Turn a teacher's config into its student's, in place: the distillation defaults, then ``overrides``.

    The defaults (METHOD.md §4): AdamW β2 = 0.95, ``method=semigroup``, one-step samples; a Duo /
    MDLM teacher distils into Duo + DCD / MDLM + SDTT (its own backbone; the optimiser as above).
    The result is validated. This is the second half of :func:`distill_config`; the two-stage main
    job also calls it to check its stage-2 config before stage 1 has produced the teacher.

    Raises:
        ConfigError: a method that does not distil from ``teacher_method``, or a bad override.
    """
    cfg.train.method = "semigroup"
    cfg.train.beta2 = 0.95
    cfg.sample.steps = 1
    baseline = {v: k for k, v in DISTILLED_BASELINES.items()}.get(teacher_method)
    if baseline:
        cfg.train.method = baseline
    for item in overrides:
        k, v = item.split("=", 1) if "=" in item else (item, None)
        if v is None:
            raise ConfigError(f"expected key=value, got {item!r}")
        set_value(cfg, k.strip(), v)
    method = cfg.train.method
    if method in DISTILLED_BASELINES:
        if self_distill or DISTILLED_BASELINES[method] != teacher_method:
            raise ConfigError(
                f"method {method} distils a {DISTILLED_BASELINES[method]} run: use --teacher RUN with "
                f"a {DISTILLED_BASELINES[method]} run"
                + (f", got a {teacher_method} checkpoint" if teacher_given else "")
            )
    elif method not in OBJECTIVES:
        raise ConfigError(
            f"distillation method must be one of {', '.join(OBJECTIVES + tuple(DISTILLED_BASELINES))}, got {method!r}"
        )
    elif teacher_method != "flm":
        raise ConfigError(f"method {method} distils an FLM; a {teacher_method} teacher distils with method={baseline}")
    else:
        cfg.model.two_time = True
    validate(cfg)
    return cfg


def distill_config(
    preset: str | None, overrides: list[str], teacher: str | None = None, self_distill: bool = False
) -> tuple[RunConfig, Tokenizer | None]:
    """The resolved config of a distillation run and the tokenizer it must keep (the teacher's; None
    when self-distilling).

    Args:
        preset: a preset or TOML file (self-distillation only; with a teacher the config is the teacher's).
        overrides: ``key=value`` items applied after the distillation defaults (see
            :func:`apply_distill_defaults`).
        teacher: the teacher's run or checkpoint directory.
        self_distill: distil without a teacher.

    Raises:
        ConfigError: neither or both of ``teacher`` and ``self_distill``, a teacher of the wrong
            kind, or a method that does not distil from it.
    """
    teacher_method = "flm"
    tokenizer = None
    if teacher and self_distill:
        raise ConfigError("give either --teacher RUN or --self, not both")
    if teacher:
        if preset is not None:
            raise ConfigError(f"with --teacher the config comes from the teacher; got a preset {preset!r}")
        tdir = ckpt.resolve(teacher)
        ckpt.verify(tdir, deep=False)
        cfg = RunConfig.from_dict(ckpt.read_json(tdir / "config.json"))
        teacher_method = cfg.train.method
        if teacher_method not in ("flm", *DISTILLED_BASELINES.values()):
            raise ConfigError(
                f"the teacher must be an FLM checkpoint (or a Duo / MDLM one for method=dcd / sdtt), "
                f"got method {teacher_method!r}: {tdir}"
            )
        tokenizer = load_tokenizer(tdir / "tokenizer")
        cfg.distill.teacher = str(tdir.resolve())
    elif self_distill:
        cfg = build_config(preset)
        cfg.distill.self_distill = True
    else:
        raise ConfigError("fmlm distill needs --teacher RUN (an FLM run) or --self")
    base = cfg.preset
    apply_distill_defaults(cfg, overrides, teacher_method, self_distill, teacher_given=bool(teacher))
    cfg.preset = f"{base}-{'self-' if self_distill else ''}{cfg.train.method}"
    return cfg, tokenizer
