"""``python -m distgpt.cli`` — the same as the ``distgpt`` console script."""

import sys

from distgpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
