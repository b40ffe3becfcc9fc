"""``python -m fxfuse ...`` — the same as the ``fxfuse`` console script."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
