"""Evaluation and benchmarks: ``fmlm eval`` and ``fmlm bench``.

* :mod:`fmlm.bench.metrics`: unigram entropy, generative perplexity, validation likelihood.
* :mod:`fmlm.bench.scorers`: scorer LMs for generative perplexity.
* :mod:`fmlm.bench.evaluate`: one checkpoint (``fmlm eval``).
* :mod:`fmlm.bench.suite`: all methods side by side and the ablations (``fmlm bench PRESET``).
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
    anything else is a preset.
    """
    from fmlm.cli import _Parser

    if target in ("train", "speed"):
        name = {"train": "throughput", "speed": "speed"}[target]
        if importlib.util.find_spec(f"fmlm.bench.{name}") is None:
            raise ConfigError(f"`fmlm bench {target}` is not part of this installation")
        module = importlib.import_module(f"fmlm.bench.{name}")
        parser = _Parser(prog=f"fmlm bench {target}", description=module.__doc__)
        module.add_arguments(parser)
        return module.run(parser.parse_args(rest))
    from fmlm.bench import suite

    if target == "report":
        parser = _Parser(prog="fmlm bench report",
                         description="Rewrite results.md, the headline and the plots of a finished bench "
                                     "from its results.json (after an upgrade, or on another machine).")
        parser.add_argument("folder", metavar="DIR", help="the output folder of `fmlm bench PRESET`")
        parser.add_argument("--no-plots", action="store_true")
        args = parser.parse_args(rest)
        print(suite.markdown(suite.report(args.folder, plots=not args.no_plots)))
        return 0
    parser = _Parser(prog="fmlm bench", description=suite.__doc__)
    suite.add_arguments(parser)
    args = parser.parse_intermixed_args([target, *rest])
    return suite.run(args, [target, *rest])
