"""``python -m distgpt`` — the same as the ``distgpt`` console script (handy in Ray job entrypoints)."""

import sys

from distgpt.cli import main

if __name__ == "__main__":  # a spawned child (DCP's save process) imports this module too
    sys.exit(main())
