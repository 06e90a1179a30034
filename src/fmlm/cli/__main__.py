"""``python -m fmlm.cli`` (e.g. under torchrun)."""

import sys

from fmlm.cli.main import main

sys.exit(main())
