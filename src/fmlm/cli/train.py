"""``fmlm train`` and ``fmlm distill``: train (or resume) a run, then report its summary and a few samples."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fmlm.cli.common import split_preset
from fmlm.cli.sample import _report_samples


def cmd_train(args: argparse.Namespace) -> int:
    from fmlm.config import build_config

    preset, overrides = split_preset(args.config)
    return _fit_and_report(build_config(preset, overrides), args)


def _fit_and_report(cfg, args, tokenizer=None) -> int:
    """Train (or resume) in the run directory, then print the summary and a few samples."""
    from fmlm.train import Trainer

    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.preset
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    trainer = Trainer(cfg, run_dir, restart=args.restart, progress=not args.quiet, log=log,
                      tokenizer=tokenizer)
    summary = trainer.fit()
    if summary["rank"] != 0:  # torchrun: rank 0 reports
        return 130 if summary["interrupted"] else 0
    if not args.no_samples and not summary["interrupted"] and hasattr(trainer.method, "sample"):
        from fmlm.api import load

        model = load(run_dir, device=trainer.device)
        summary["samples"] = _report_samples(model, [cfg.sample.steps], cfg.sample.num_samples,
                                             cfg.sample.seed, cfg.sample.float64, show=not args.quiet,
                                             check=model.task is not None)
    print(json.dumps(summary, indent=2))
    return 130 if summary["interrupted"] else 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Stage 2: distil an FLM teacher into a flow map (or self-distil from scratch)."""
    from fmlm import checkpoint as ckpt
    from fmlm.config import RunConfig, build_config, set_value, validate
    from fmlm.data import load_tokenizer
    from fmlm.errors import ConfigError
    from fmlm.methods import DISTILLED_BASELINES
    from fmlm.methods.flow_map import OBJECTIVES

    teacher_method = "flm"
    preset, overrides = split_preset(args.config)
    tokenizer = None
    if args.teacher and args.self_distill:
        raise ConfigError("give either --teacher RUN or --self, not both")
    if args.teacher:
        if preset is not None:
            raise ConfigError(f"with --teacher the config comes from the teacher; got a preset {preset!r}")
        teacher = ckpt.resolve(args.teacher)
        ckpt.verify(teacher, deep=False)
        cfg = RunConfig.from_dict(ckpt.read_json(teacher / "config.json"))
        teacher_method = cfg.train.method
        if teacher_method not in ("flm", *DISTILLED_BASELINES.values()):
            raise ConfigError(f"the teacher must be an FLM checkpoint (or a Duo / MDLM one for method=dcd / sdtt), "
                              f"got method {teacher_method!r}: {teacher}")
        tokenizer = load_tokenizer(teacher / "tokenizer")
        base = cfg.preset
        cfg.distill.teacher = str(teacher.resolve())
    elif args.self_distill:
        cfg = build_config(preset)
        base = cfg.preset
        cfg.distill.self_distill = True
    else:
        raise ConfigError("fmlm distill needs --teacher RUN (an FLM run) or --self")
    # Distillation defaults (METHOD.md §4): AdamW β2 = 0.95, semigroup, one-step samples.
    cfg.train.method = "semigroup"
    cfg.train.beta2 = 0.95
    cfg.sample.steps = 1
    # A Duo/MDLM teacher distils into Duo + DCD / MDLM + SDTT (its own backbone; the optimiser as above).
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
        if args.self_distill or DISTILLED_BASELINES[method] != teacher_method:
            raise ConfigError(f"method {method} distils a {DISTILLED_BASELINES[method]} run: use --teacher RUN with "
                              f"a {DISTILLED_BASELINES[method]} run" + (f", got a {teacher_method} checkpoint"
                                                                         if args.teacher else ""))
    elif method not in OBJECTIVES:
        raise ConfigError(f"distillation method must be one of {', '.join(OBJECTIVES + tuple(DISTILLED_BASELINES))}, "
                          f"got {method!r}")
    elif teacher_method != "flm":
        raise ConfigError(f"method {method} distils an FLM; a {teacher_method} teacher distils with "
                          f"method={baseline}")
    else:
        cfg.model.two_time = True
    validate(cfg)
    cfg.preset = f"{base}-{'self-' if args.self_distill else ''}{cfg.train.method}"
    return _fit_and_report(cfg, args, tokenizer=tokenizer)
