"""Fault drills — every injected fault in one place: what the controller does with them (``ControllerDrills``) and
what a rank does (``RankDrills``, the trainer's step hooks inside each worker). No Ray.

Specs (``cluster.inject``, parsed by ``recovery/faults.py``): ``kill@STEP:RANK`` — that rank SIGKILLs itself before
step STEP + 1 (a real crash, no clean-up); ``hang@STEP:RANK`` — it stops, so its peers block in the next collective
until the watchdog fires; ``oom@STEP:RANK`` — it raises torch's OutOfMemoryError (a training error);
``slow@STEP:RANK`` — it sleeps before every step from STEP on (a straggler); ``preempt@STEP:RANK`` — a preemption
notice for that rank's node: every rank checkpoints after STEP, then drains until the controller lets the node go and
re-plans without it; ``remove@STEP:RANK`` — that rank's node dies without notice: the rank SIGKILLs its node's
raylet before step STEP + 1, so every process of the node goes and Ray marks the node dead after its missed health
checks (never the controller's node: the worker group moves the fault to a rank elsewhere). Each fault fires once per
run: a restarted group is not armed with it again.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from distgpt.recovery.faults import SLOW_S, WORKER_FAULTS, Fault
from distgpt.recovery.policy import Failure, FailureKind

_FIRED_AS = {FailureKind.WORKER_DIED: "kill", FailureKind.HANG: "hang", FailureKind.TRAINING_ERROR: "oom",
             FailureKind.NODE_LOST: "remove"}
"""The failure each rank-fired fault is usually seen as."""

Notice = tuple[int, int, str]
"""A preemption notice: (checkpoint step, rank, node id)."""


class ControllerDrills:
    """The controller's one hook into fault drills: arm a new group, forget a fault once it fired, and turn a
    preemption drill into a notice. ``faults`` is shared with the caller (the controller's ``faults``)."""

    def __init__(self, faults: list[Fault]):
        self.faults = faults

    def arm(self, group: Any) -> None:
        """Give a freshly scheduled group the faults still to fire (ranks fire them at their exact step)."""
        armed = [f for f in self.faults if f.kind in WORKER_FAULTS]
        if armed:
            group.arm(armed)

    def fired(self, failure: Failure) -> None:
        """A kill, hang, OOM or node removal fired (one per attempt: the group dies with it): do not arm it again.

        Which one is the earliest still pending at or before the failure's step (faults fire in step order, and
        one not yet reached lies after it) — not the failure's kind: a node removal the watchdog sees first is a
        hang. Failing that (the failure seen before the step was reported), the earliest of the failure's kind."""
        if failure.kind not in _FIRED_AS:
            return
        pending = [f for f in self.faults if f.kind in _FIRED_AS.values()]
        fault = next((f for f in pending if f.step <= failure.step), None)
        fault = fault or next((f for f in pending if f.kind == _FIRED_AS[failure.kind]), None)
        if fault is not None:
            self.faults.remove(fault)

    def preemption(self, nodes: dict[int, str]) -> Notice | None:
        """The pending preemption drill as a notice (None without one)."""
        drill = next((f for f in self.faults if f.kind == "preempt"), None)
        return None if drill is None else (drill.step, drill.rank, nodes.get(drill.rank, ""))

    def preempted(self) -> None:
        """The drilled node has been let go: the preemption drill is spent."""
        drill = next((f for f in self.faults if f.kind == "preempt"), None)
        if drill is not None:
            self.faults.remove(drill)


class RankDrills:
    """One rank's step hooks (``train.trainer.StepHooks``): injected faults at their step, and the checkpoint a
    preemption notice asks for. ``log`` sends a line to the controller."""

    def __init__(self, rank: int, log: Callable[[str], None]):
        self.rank, self.log = rank, log
        self.faults: list[Fault] = []
        self.checkpoint_step = -1

    def arm(self, faults: list[Fault]) -> None:
        """The faults this rank fires itself (its own kills and hangs, and every preemption)."""
        self.faults = list(faults)

    def checkpoint_at(self, step: int) -> None:
        """Preemption notice: save a checkpoint after ``step``, then train no further (the node is going away)."""
        self.checkpoint_step = step

    def before_step(self, step: int) -> None:
        """Drain after a preemption checkpoint; fire a kill, hang or OOM armed for this step; straggle if slow."""
        while self._draining(step):
            time.sleep(0.5)  # the checkpoint is saved; wait to be stopped (the node is about to go)
        for f in self.faults:
            if f.kind == "slow" and f.rank == self.rank and f.step <= step:
                time.sleep(SLOW_S)
            if f.kind == "oom" and f.step == step and f.rank == self.rank:
                import torch

                raise torch.OutOfMemoryError(f"injected fault: out of memory on rank {self.rank} before step "
                                             f"{step + 1} (cluster.inject)")
            if f.step == step and f.rank == self.rank and f.kind in ("kill", "hang", "remove"):
                what = "removal of its node" if f.kind == "remove" else f.kind
                self.log(f"injected fault: {what} on rank {self.rank} before step {step + 1}")
                time.sleep(0.3)  # let the controller's next poll carry the line out
                if f.kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if f.kind == "remove":
                    os.kill(node_daemon_pid(), signal.SIGKILL)  # the node's processes, this one too, go with it
                time.sleep(3600.0)

    def after_step(self, step: int) -> None:
        """Nothing to do: drills fire before a step."""

    def checkpoint_due(self, step: int) -> bool:
        """Every rank is told the same step, so all of them join the collective save at once."""
        return step == self.checkpoint_step or any(f.kind == "preempt" and f.step == step for f in self.faults)

    def _draining(self, step: int) -> bool:
        notices = [self.checkpoint_step] + [f.step for f in self.faults if f.kind == "preempt"]
        return any(0 <= at < step for at in notices)


def away_from(faults: list[Fault], nodes: dict[int, str], keep: str) -> list[Fault]:
    """``faults`` with each node removal moved off ``keep`` (the controller's node: taking it down would end the run,
    not drill a recovery) and onto a rank of the current group (ranks drawn for an earlier, larger Plan wrap round):
    the first rank from the drawn one on whose node the controller does not run."""
    out, world = [], len(nodes)
    for f in faults:
        if f.kind == "remove" and world:
            rank = next((r % world for r in range(f.rank, f.rank + world) if nodes.get(r % world) != keep), None)
            if rank is None:
                raise ValueError(f"injected fault remove@{f.step}:{f.rank}: every rank runs on the controller's node, "
                                 "which the drill must not take down — add a node with worker slots")
            f = Fault(f.kind, f.step, rank)
        out.append(f)
    return out


def node_daemon_pid() -> int:
    """The pid of this worker's node daemon (Ray's raylet, which started the worker process — the rank's process is
    the worker's child, so it is a parent or grandparent); raises if there is none — killing anything else would not
    remove a node."""
    pid, names = os.getppid(), []
    for _ in range(3):
        try:
            name = open(f"/proc/{pid}/comm").read().strip()  # noqa: SIM115 (one read of a proc file)
            parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])  # noqa: SIM115
        except (OSError, ValueError, IndexError):
            name, parent = "?", 0
        if name == "raylet":
            return pid
        names.append(f"pid {pid}, {name!r}")
        if parent <= 1:
            break
        pid = parent
    raise RuntimeError(f"injected fault 'remove': no Ray raylet above this worker ({'; '.join(names)}), so there is "
                       "no node to take down (remove needs Ray workers on Linux)")
