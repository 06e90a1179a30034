"""Command-line interface: ``fmlm train | distill | sample | eval | bench | serve | plot | data | config |
export | import``.

Every user-fixable problem (unknown preset or key, bad value, missing or corrupt
checkpoint, empty or non-UTF-8 corpus, ...) is reported as one line on stderr
with exit code 2, never a traceback.
"""

from fmlm.cli.main import main
from fmlm.cli.parser import build_parser

__all__ = ["build_parser", "main"]
