"""``python -m distgpt`` — the same as the ``distgpt`` console script (handy in Ray job entrypoints)."""

import sys

from distgpt.cli import main

sys.exit(main())
