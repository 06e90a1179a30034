"""The stage-2 run config: what ``fmlm distill`` (and the two-stage main job) trains.

:func:`distill_config` turns a teacher checkpoint (or ``--self`` with a preset) and
``key=value`` overrides into the student's :class:`~fmlm.config.RunConfig`;
:func:`apply_distill_defaults` is its second half, which also lets the main job check a
distillation config before its first stage has produced the teacher.
"""

from __future__ import annotations

from pathlib import Path

from fmlm.config import RunConfig


def apply_distill_defaults(cfg: RunConfig, overrides, teacher_method: str = "flm",
                           self_distill: bool = False, teacher_given: bool = True) -> RunConfig:
    """Turn a teacher's config into its student's, in place: METHOD.md §4's defaults, then ``overrides``.

    AdamW β2 = 0.95, semigroup, one-step samples; a Duo / MDLM teacher distils into Duo + DCD /
    MDLM + SDTT. The result is validated (ConfigError, one line, on a bad combination).
    """
    from fmlm.config import set_value, validate
    from fmlm.errors import ConfigError
    from fmlm.methods import DISTILLED_BASELINES
    from fmlm.methods.fmlm import OBJECTIVES

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
            raise ConfigError(f"method {method} distils a {DISTILLED_BASELINES[method]} run: use --teacher RUN with "
                              f"a {DISTILLED_BASELINES[method]} run" + (f", got a {teacher_method} checkpoint"
                                                                         if teacher_given else ""))
    elif method not in OBJECTIVES:
        raise ConfigError(f"distillation method must be one of {', '.join(OBJECTIVES + tuple(DISTILLED_BASELINES))}, "
                          f"got {method!r}")
    elif teacher_method != "flm":
        raise ConfigError(f"method {method} distils an FLM; a {teacher_method} teacher distils with "
                          f"method={baseline}")
    else:
        cfg.model.two_time = True
    validate(cfg)
    return cfg


def distill_config(teacher: str | Path | None = None, self_distill: bool = False, preset: str | None = None,
                   overrides=()) -> tuple[RunConfig, object]:
    """(student config, the teacher's tokenizer or None) of ``fmlm distill --teacher RUN | --self PRESET``.

    ``teacher`` is a run or checkpoint directory (its newest valid checkpoint); the config
    then comes from the teacher, and its run directory defaults to ``runs/<preset>-<method>``.
    """
    from fmlm import checkpoint as ckpt
    from fmlm.config import build_config
    from fmlm.data import load_tokenizer
    from fmlm.errors import ConfigError
    from fmlm.methods import DISTILLED_BASELINES

    teacher_method, tokenizer = "flm", None
    if teacher and self_distill:
        raise ConfigError("give either --teacher RUN or --self, not both")
    if teacher:
        if preset is not None:
            raise ConfigError(f"with --teacher the config comes from the teacher; got a preset {preset!r}")
        path = ckpt.resolve(teacher)
        ckpt.verify(path, deep=False)
        cfg = RunConfig.from_dict(ckpt.read_json(path / "config.json"))
        teacher_method = cfg.train.method
        if teacher_method not in ("flm", *DISTILLED_BASELINES.values()):
            raise ConfigError(f"the teacher must be an FLM checkpoint (or a Duo / MDLM one for method=dcd / sdtt), "
                              f"got method {teacher_method!r}: {path}")
        tokenizer = load_tokenizer(path / "tokenizer")
        cfg.distill.teacher = str(path.resolve())
    elif self_distill:
        cfg = build_config(preset)
        cfg.distill.self_distill = True
    else:
        raise ConfigError("fmlm distill needs --teacher RUN (an FLM run) or --self")
    base = cfg.preset
    apply_distill_defaults(cfg, overrides, teacher_method, self_distill, teacher_given=bool(teacher))
    cfg.preset = f"{base}-{'self-' if self_distill else ''}{cfg.train.method}"
    return cfg, tokenizer
