"""The one error base type. Every error a user can cause or fix derives from ``DistgptError``; its message names the
problem and the fix, and the command layer catches it once (``distgpt.cli.main``): one line on stderr, no traceback,
and the exit code the class declares. Imports nothing, so any module can raise one without pulling in torch or Ray.
"""

from __future__ import annotations


class DistgptError(Exception):
    """A problem the user can fix; ``str(e)`` says what is wrong and how to fix it."""

    exit_code: int = 2
    """2: bad input (job file, paths, plans, storage); 1: a run that failed on the cluster."""


class RunFailed(DistgptError):
    """A run started and failed (on the cluster or in training): exit code 1."""

    exit_code = 1
