"""The thin commands: ``fmlm eval | bench | data | config | serve | plot``, each one library call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fmlm.cli.common import split_preset


def cmd_eval(args: argparse.Namespace) -> int:
    from fmlm.bench.evaluate import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """``fmlm bench PRESET ...`` (the side-by-side suite), ``bench train ...`` (throughput), ``bench report DIR``."""
    from fmlm.bench import dispatch

    return dispatch(args.target, args.rest)


def cmd_data(args: argparse.Namespace) -> int:
    from fmlm.config import build_config
    from fmlm.train import load_data

    preset, overrides = split_preset(args.config)
    cfg = build_config(preset, overrides)
    bundle = load_data(cfg)
    info = dict(bundle.info)
    info.update(
        vocab_size=bundle.tokenizer.vocab_size,
        tokenizer=bundle.tokenizer.spec,
        seq_len=cfg.data.seq_len,
        train_blocks=len(bundle.train),
        val_blocks=len(bundle.val),
    )
    print(json.dumps(info, indent=2, default=str))
    for i in range(min(args.show, len(bundle.train))):
        print(f"--- train block {i}", file=sys.stderr)
        print(bundle.tokenizer.decode(bundle.train.batch([i])[0].tolist()), file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fmlm.config import PRESETS, build_config

    if args.list:
        for name in PRESETS:
            print(name)
        return 0
    preset, overrides = split_preset(args.config)
    print(json.dumps(build_config(preset, overrides).to_dict(), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fmlm.serve import ServeLimits, serve

    limits = ServeLimits(
        max_steps=args.max_steps,
        max_samples=args.max_samples,
        max_queue=args.max_queue,
        batch_max=args.batch_max,
        batch_window=args.batch_window,
    )
    serve(
        args.ckpt,
        host=args.host,
        port=args.port,
        threads=args.threads,
        limits=limits,
        device=args.device,
        docs=args.docs,
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fmlm.plot import run

    result = run(
        args.what,
        Path(args.out),
        args.vocab,
        seed=args.seed,
        flm_steps=args.flm_steps,
        fmlm_steps=args.fmlm_steps,
        progress=not args.quiet,
    )
    print(json.dumps(result, indent=2))
    return 0
