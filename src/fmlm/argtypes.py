"""argparse pieces shared by the command line (:mod:`fmlm.cli`) and the bench commands (:mod:`fmlm.bench`).

A usage error is one line on stderr with exit code 2; the ``type=`` converters raise
``argparse.ArgumentTypeError``, which argparse turns into such a line.
"""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def steps_list(text: str) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16]; every entry an integer >= 1."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be integers, got {text!r}") from None
    if not steps or any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"steps must be >= 1, got {text!r}")
    return steps


def port(text: str) -> int:
    """A TCP port, 0..65535."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535, got {v}")
    return v


def positive(text: str) -> int:
    """An integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def milliseconds(text: str) -> float:
    """A duration in milliseconds, >= 0 and finite (returned in seconds)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, got {text!r}") from None
    if not 0.0 <= v < 1e7:
        raise argparse.ArgumentTypeError(f"expected milliseconds in [0, 1e7), got {text!r}")
    return v / 1000.0
