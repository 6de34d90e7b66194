"""One rank of a run: a Ray actor that joins the process group and runs the ordinary ``Trainer``.

The trainer runs in a child process of the actor (``rank_process.py``: on a thread of the actor, Ray's own threads
cost it ~3% a step), or — for an RL learner, whose batches come from Ray actors — on a thread of the actor. Either
way the actor keeps answering ``poll`` (heartbeat, metrics, errors) while a step is in progress: that is how the
controller tells a slow step from a hung collective. Only rank 0 emits metric records.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from typing import Any

from distgpt.config import JobConfig
from distgpt.orchestrator.drills import RankDrills
from distgpt.orchestrator.rank_process import RankProcess, failure_text, train_rank
from distgpt.orchestrator.status import RankStatus, RunResult
from distgpt.planner.plan import Plan


class TrainWorker:
    """The actor body (decorated with ``ray.remote`` by the worker group)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.records: deque = deque()
        self.logs: deque = deque()
        self.trainer = None
        """The trainer when it runs on this actor's thread (an RL learner)."""
        self.process: RankProcess | None = None
        """The rank's process when the trainer runs there (every other run)."""
        self.step: int | None = None
        """The last step the rank's process reported."""
        self.state = "created"
        self.error: str | None = None
        self.result: RunResult | None = None
        self.drills = RankDrills(rank, self.logs.append)
        """The trainer's step hooks: injected faults, and checkpoints a preemption notice asks for."""

    def address(self) -> tuple[str, str, int]:
        """(node id, node ip, a free port on it) — rank 0's becomes the rendezvous address."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return ray.get_runtime_context().get_node_id(), ip, port

    def start(self, job: JobConfig, plan: Plan, master: tuple[str, int], threads: int, rollout: str = "") -> None:
        """Set the torch.distributed environment and start training: in a child process, or on a background thread
        for an RL learner (``rollout``: the name of its rollout coordinator, whose batches replace the prepared
        dataset — read through Ray, which the child process does not have)."""
        os.environ.update({"MASTER_ADDR": master[0], "MASTER_PORT": str(master[1]), "RANK": str(self.rank),
                           "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": "0"})
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if "CUDA_VISIBLE_DEVICES" not in os.environ else "cuda")
        self.state = "starting"
        if not rollout:
            self.process = RankProcess(self._take)
            self.process.start(job, plan, threads)
            return
        from distgpt.parallel.mesh import keep_gloo_on_loopback
        from distgpt.train.threads import use_threads

        keep_gloo_on_loopback()
        use_threads(threads)  # the process's setting; the training thread sets its own below
        threading.Thread(target=self._run, args=(job, plan, rollout, threads), daemon=True,
                         name="distgpt-train").start()

    def _take(self, kind: str, payload: Any) -> None:
        """A message from the rank's process."""
        if kind == "step":
            self.step = payload
        elif kind == "record":
            self.records.append(payload)
        elif kind == "log":
            self.logs.append(payload)
        elif kind == "state":
            self.state = payload
        elif kind == "result":
            self.result, self.state = payload, "done"
        elif kind == "error":
            self.error, self.state = payload, "error"

    def _run(self, job: JobConfig, plan: Plan, rollout: str, threads: int) -> None:
        from distgpt.orchestrator.rl_source import RolloutSource
        from distgpt.train.threads import use_threads

        def running(trainer: Any) -> None:
            self.trainer, self.state = trainer, "running"

        use_threads(threads)  # on the thread that trains: OpenMP keeps a count per thread (train/threads.py)
        try:
            source = RolloutSource(job, rollout, self.rank)
            self.result = train_rank(job, plan, self.logs.append, self.records.append, self.drills, source, running)
            self.state = "done"
        except BaseException as e:  # reported to the controller, which decides what to do
            self.error, self.state = failure_text(e), "error"

    def poll(self) -> RankStatus:
        """Heartbeat: current step (None before the trainer exists), new records and log lines, state, error."""
        records, logs = [], []
        while self.records:
            records.append(self.records.popleft())
        while self.logs:
            logs.append(self.logs.popleft())
        step = self.trainer.step if self.trainer is not None else self.step
        return RankStatus(self.rank, step, self.state, records, logs, self.error, self.result)

    def trainer_pid(self) -> int:
        """The pid of the process that trains (the child; this actor's own on the RL learner's thread)."""
        pid = self.process.pid() if self.process is not None else None
        return pid if pid is not None else os.getpid()

    # --- controller requests --------------------------------------------------------------------------------------
    def arm(self, faults: list) -> None:
        """Faults (``distgpt.recovery.faults.Fault``) this rank fires at their step (drills and tests)."""
        self.drills.arm(faults)
        if self.process is not None:
            self.process.send("arm", list(faults))

    def checkpoint_at(self, step: int) -> None:
        """Preemption notice: save a checkpoint after ``step``, then train no further (the node is going away)."""
        self.drills.checkpoint_at(step)
        if self.process is not None:
            self.process.send("checkpoint_at", step)
