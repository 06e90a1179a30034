"""Moved to :mod:`fmlm.train.distributed` (this name stays for imports written before the move)."""

from fmlm.train.distributed import *  # noqa: F403
