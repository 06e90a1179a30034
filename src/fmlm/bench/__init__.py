"""Evaluation and benchmarks: ``fmlm eval`` and ``fmlm bench``.

* :mod:`fmlm.bench.metrics`: unigram entropy, generative perplexity, validation likelihood.
* :mod:`fmlm.bench.scorers`: scorer LMs for generative perplexity.
* :mod:`fmlm.bench.evaluate`: one checkpoint (``fmlm eval``).
* :mod:`fmlm.bench.suite`: all methods side by side and the ablations (``fmlm bench PRESET``).
* :mod:`fmlm.bench.scaling`: the comparison at several budgets and widths (``fmlm bench scaling``).
* :mod:`fmlm.bench.report`: a bench's headline, tables, plots, saved samples and re-scoring
  (``fmlm bench report DIR``); :mod:`fmlm.bench.rescore` re-scores saved samples
  (``fmlm bench rescore DIR --scorer NAME``).
* ``fmlm bench train`` (training throughput) lives in :mod:`fmlm.bench.throughput`,
  ``fmlm bench speed`` (sampling speed and FLOP utilisation) in :mod:`fmlm.bench.speed`.
"""

from __future__ import annotations

import importlib
import importlib.util

from fmlm.errors import ConfigError

__all__ = ["dispatch"]


def dispatch(target: str, rest: list[str]) -> int:
    """Run ``fmlm bench TARGET REST...``.

    ``train`` goes to the throughput module, ``report DIR`` re-renders a finished bench,
    ``rescore DIR --scorer NAME`` scores its saved samples under another scorer, anything
    else is a preset.
    """
    from fmlm.argtypes import Parser

    if target in ("train", "speed"):
        name = {"train": "throughput", "speed": "speed"}[target]
        if importlib.util.find_spec(f"fmlm.bench.{name}") is None:
            raise ConfigError(f"`fmlm bench {target}` is not part of this installation")
        module = importlib.import_module(f"fmlm.bench.{name}")
        parser = Parser(prog=f"fmlm bench {target}", description=module.__doc__)
        module.add_arguments(parser)
        return module.run(parser.parse_args(rest))
    from fmlm.bench import report, suite

    if target == "scaling":
        from fmlm.bench import scaling

        parser = Parser(prog="fmlm bench scaling", description=scaling.__doc__)
        scaling.add_arguments(parser)
        return scaling.run(parser.parse_intermixed_args(rest), rest)
    if target == "rescore":
        import shlex
        import sys

        from fmlm.argtypes import positive
        from fmlm.bench.scorers import load_scorer

        parser = Parser(
            prog="fmlm bench rescore",
            description="Score the saved samples (samples.jsonl) of a finished bench under another "
            "scorer LM, without sampling again; writes results.json, results.md and "
            "plots to DIR-<scorer> (or --out).",
        )
        parser.add_argument("folder", metavar="DIR", help="the output folder of `fmlm bench PRESET`")
        parser.add_argument("--scorer", required=True, help="gemma-3-270m, smollm2-135m, ar:RUN, a HF name or dir")
        parser.add_argument("--scorer-batch", type=positive, help="texts per scorer forward pass")
        parser.add_argument("--out", help="output folder (default: DIR-<scorer>; DIR itself rewrites it)")
        parser.add_argument("--device", help="cpu, cuda, mps (default: best available)")
        parser.add_argument("--no-plots", action="store_true")
        parser.add_argument("--quiet", action="store_true")
        args = parser.parse_args(rest)
        log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
        from fmlm.bench import rescore

        rescore.read_samples(args.folder)  # fail on a missing file before loading a scorer
        scorer = load_scorer(args.scorer, batch_size=args.scorer_batch, device=args.device)
        command = "fmlm bench rescore " + " ".join(shlex.quote(a) for a in rest)
        result, dest = rescore.rescore(args.folder, scorer, args.out, plots=not args.no_plots, command=command, log=log)
        log(f"wrote {dest / 'results.json'}, {dest / 'results.md'}")
        print(report.markdown(result))
        return 0
    if target == "report":
        parser = Parser(
            prog="fmlm bench report",
            description="Rewrite results.md, the headline and the plots of a finished bench "
            "from its results.json (after an upgrade, or on another machine).",
        )
        parser.add_argument("folder", metavar="DIR", help="the output folder of `fmlm bench PRESET`")
        parser.add_argument("--no-plots", action="store_true")
        args = parser.parse_args(rest)
        print(report.markdown(report.report(args.folder, plots=not args.no_plots)))
        return 0
    parser = Parser(prog="fmlm bench", description=suite.__doc__)
    suite.add_arguments(parser)
    args = parser.parse_intermixed_args([target, *rest])
    return suite.run(args, [target, *rest])
