"""``fmlm``'s entry point: parse, run the command, turn every FmlmError into one line and exit code 2."""

from __future__ import annotations

import sys

from fmlm.cli.parser import build_parser
from fmlm.errors import FmlmError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (``fmlm train tiny --quiet lr=1e-3``): argparse leaves
    # those as unknown arguments, so collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "config") and all("=" in e and not e.startswith("-") for e in extra):
            args.config = list(args.config) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from fmlm import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        import torch

        # Near-one-hot states late in the flow give denormal floats in softmax/exp, which
        # are very slow on CPUs; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
        return args.func(args)
    except FmlmError as e:
        sys.stderr.write(f"fmlm: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fmlm: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
