"""torch's CPU thread count as the calling thread sees it.

OpenMP keeps its thread count per calling thread: ``torch.set_num_threads`` on one thread does not reach a thread
that already exists or is started later, while ``torch.get_num_threads()`` reports the setting everywhere. Ray runs
an actor's methods on its own threads with ``OMP_NUM_THREADS`` set to the actor's CPUs (1 by default), so a count
set in one method left the training thread single-threaded in half its kernels — 13% slower steps on 2 cores, with
the start-up line saying "2 threads". Set the count on the thread that computes; read it from there.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch


def use_threads(n: int) -> None:
    """``n`` intra-op threads for torch, for the calling thread's kernels too (call it on the thread that computes)."""
    torch.set_num_threads(max(1, n))


def adopt_process_threads() -> None:
    """Give a new thread the process's torch thread count (it starts at OpenMP's default, OMP_NUM_THREADS)."""
    torch.set_num_threads(torch.get_num_threads())


def threads_here() -> int:
    """Threads torch's OpenMP kernels use when called from this thread (torch's setting where OpenMP is not found)."""
    fn = _omp_max_threads()
    return int(fn()) if fn is not None else torch.get_num_threads()


def _omp_max_threads() -> Callable[[], int] | None:
    try:
        return ctypes.CDLL(None).omp_get_max_threads  # the OpenMP runtime torch loaded (libgomp / libiomp)
    except (OSError, AttributeError):
        return None
