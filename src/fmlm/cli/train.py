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
    cfg = build_config(preset, overrides)
    if "+" in cfg.train.method:  # a two-stage job, e.g. flm+semigroup (the default preset's)
        from fmlm.mainjob import cmd_main_job

        return cmd_main_job(cfg, args)
    return _fit_and_report(cfg, args)


def _fit_and_report(cfg, args, tokenizer=None) -> int:
    """Train (or resume) in the run directory, then print the summary and a few samples."""
    from fmlm.train import Trainer

    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.preset
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    trainer = Trainer(cfg, run_dir, restart=args.restart, progress=not args.quiet, log=log, tokenizer=tokenizer)
    summary = trainer.fit()
    if summary["rank"] != 0:  # torchrun: rank 0 reports
        return 130 if summary["interrupted"] else 0
    if not args.no_samples and not summary["interrupted"] and hasattr(trainer.method, "sample"):
        from fmlm.api import load

        model = load(run_dir, device=trainer.device)
        summary["samples"] = _report_samples(
            model,
            [cfg.sample.steps],
            cfg.sample.num_samples,
            cfg.sample.seed,
            cfg.sample.float64,
            show=not args.quiet,
            check=model.task is not None,
        )
    print(json.dumps(summary, indent=2))
    return 130 if summary["interrupted"] else 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Stage 2: distil an FLM teacher into a flow map (or self-distil from scratch)."""
    from fmlm.train.distill import distill_config

    preset, overrides = split_preset(args.config)
    cfg, tokenizer = distill_config(preset, overrides, teacher=args.teacher, self_distill=args.self_distill)
    return _fit_and_report(cfg, args, tokenizer=tokenizer)
