"""Is the Ray job this driver runs in still wanted? A driver that outlives its stopped job stops its run.

``ray job stop`` (and ``distgpt stop``) ends a job by signalling its entrypoint's process tree, as it is at that
moment. Stopped while the job is still PENDING (its runtime env being set up), the supervisor signals the entrypoint
shell the instant it starts: the shell dies, and a driver it forked in that instant is missed, runs on with the job
marked STOPPED, and holds its workers' slots until it ends by itself — for a long run, hours (this is what left two
slots taken for the rest of a test session, and three later runs could not place). Ray starts the entrypoint in a
session of its own, so the entrypoint's shell leads the driver's session; a driver whose session leader (or, where
the shell exec'd it, whose parent: the supervisor) is gone has lost its job, and says so and stops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Set by Ray's job supervisor in the entrypoint's environment (and so for what it starts): we are a job's driver.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass(frozen=True)
class JobWatch:
    """The process whose end means this driver's Ray job was stopped (or its supervisor died)."""

    leader: int

    @classmethod
    def here(cls) -> JobWatch | None:
        """The watch for this process when it is a Ray job's driver; None otherwise (a terminal, torchrun, a test):
        outside a job, a parent that goes away (nohup, a closed terminal) is no reason to stop training."""
        if RAY_JOB_ENV not in os.environ:
            return None
        sid = os.getsid(0)
        return cls(sid if sid != os.getpid() else os.getppid())

    def gone(self) -> bool:
        """True once the leader has ended (or this process was orphaned before the watch was taken)."""
        return self.leader <= 1 or not alive(self.leader)

    def reason(self, resume: str = "resume it by submitting the same job again (it continues from its last "
                                   "checkpoint)") -> str:
        """What a driver that stops for this says; ``resume`` tells how to carry on."""
        return (f"the Ray job running this driver was stopped (its entrypoint process {self.leader} is gone) — the "
                f"run stops here; {resume}")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie — ended, not yet reaped — counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return not os.path.exists("/proc/self")  # no procfs to ask: kill(0) said it exists
