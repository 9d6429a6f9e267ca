"""``python -m sparsecode``: the same command line as the ``sparsecode`` script."""

import sys

from sparsecode.cli import main

sys.exit(main())
