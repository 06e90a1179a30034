"""``python -m fmlm.guidance_bench``: moved to :mod:`fmlm.bench.guidance` (this command and name still work)."""

import sys

from fmlm.bench.guidance import CharNgram, main, sample_entropy

__all__ = ["CharNgram", "main", "sample_entropy"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
