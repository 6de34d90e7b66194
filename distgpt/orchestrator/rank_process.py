"""A rank's trainer in a process of its own, a child of its worker actor.

Why not on a thread of the actor: a Ray worker's own threads (its core worker loop takes the GIL every 10 ms to check
for signals, its RPC threads answer the controller's polls) share the GIL and the cores with the training thread.
Measured on the 2-core VM, the same training loop interleaved in 6 s windows (SIGSTOP/SIGCONT, 15 pairs, two runs):
on a thread of a Ray actor it took 2.5–3.7% longer a step than in a child process of that actor (medians 0.963 and
0.975, ±1.2%), while a second thread against the main thread of a plain process made no difference (1.001). The
child imports neither Ray nor anything of it; the actor only relays, so its Ray threads no longer touch the steps.

The child talks to the actor over two pipes (``multiprocessing.connection`` over file descriptors, pickled tuples):
it sends ``(kind, payload)`` — ``step``, ``record``, ``log``, ``state``, ``result``, ``error`` — and receives the
drills' ``arm`` and ``checkpoint_at``. It dies with the actor (``PR_SET_PDEATHSIG``, and a check of its parent at
start), and a rank process that dies by a signal takes the actor with it, so the controller sees the rank die
exactly as it did when the trainer ran inside the actor (a ``kill`` drill, a segfault, the OOM killer).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

Message = tuple[str, Any]

_PR_SET_PDEATHSIG = 1


class RankProcess:
    """The actor's side: start the child, hand every message it sends to ``on_message``, forward drill requests.

    The child is started from a thread of this object's own that lives as long as the child: Linux sends the
    parent-death signal when the *thread* that forked exits, and Ray's method threads are not ours to keep alive."""

    def __init__(self, on_message: Callable[[str, Any], None]):
        self.on_message = on_message
        self.proc: subprocess.Popen | None = None
        self._to_child: Connection | None = None
        self._lock = threading.Lock()
        self._started = threading.Event()

    def start(self, job: Any, plan: Any, threads: int) -> None:
        """Start the rank's process (returns once it runs; training starts there)."""
        threading.Thread(target=self._own, args=(job, plan, threads), daemon=True, name="distgpt-rank").start()
        self._started.wait()

    def send(self, kind: str, payload: Any) -> None:
        """A drill request for the child (``arm``, ``checkpoint_at``); dropped once the child is gone (its end is
        what the relay reports)."""
        with self._lock:
            if self._to_child is None:
                return
            try:
                self._to_child.send((kind, payload))
            except (BrokenPipeError, ConnectionResetError):
                self._to_child = None

    def pid(self) -> int | None:
        """The rank process's pid (None before it starts)."""
        return self.proc.pid if self.proc is not None else None

    def _own(self, job: Any, plan: Any, threads: int) -> None:
        up_r, up_w = os.pipe()  # child → actor
        down_r, down_w = os.pipe()  # actor → child
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads)),  # Ray set the actor's to its reserved CPUs
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what the actor imports from (working_dir)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "distgpt.orchestrator.rank_process", str(up_w), str(down_r), str(os.getpid())],
                pass_fds=(up_w, down_r), env=env, close_fds=True)
            self._to_child = Connection(down_w)
            self._to_child.send(("start", (job, plan, threads)))  # a broken pipe here: the child died at once
        except OSError as e:  # no process, or one that died before reading its job: a training error to report
            self.on_message("error", f"could not start the rank's process: {type(e).__name__}: {e}")
            if self.proc is None:
                os.close(up_r)
                os.close(down_w)
                return
        finally:
            os.close(up_w)
            os.close(down_r)
            self._started.set()  # start() must return whatever happened: the controller polls for the outcome
        self._relay(Connection(up_r))

    def _relay(self, up: Connection) -> None:
        """Pass the child's messages on until it ends; then say how it ended."""
        finished = False
        while True:
            try:
                kind, payload = up.recv()
            except (EOFError, OSError):
                break
            finished = finished or kind in ("result", "error")
            self.on_message(kind, payload)
        assert self.proc is not None
        code = self.proc.wait()
        with self._lock:
            self._to_child = None
        if code < 0 and not finished:
            # Killed by a signal (a kill drill, a segfault, the OOM killer): the rank died, so its actor dies too,
            # and the controller sees what it saw when the trainer ran in the actor — a dead rank.
            os.kill(os.getpid(), signal.SIGKILL)
        if not finished:
            self.on_message("error", f"the rank's process exited with code {code} before reporting a result")


# --- the child ---------------------------------------------------------------------------------------------------


class _Uplink:
    """The child's one way out: pickled ``(kind, payload)`` tuples, from the training and the drill threads alike."""

    def __init__(self, conn: Connection):
        self.conn, self.lock = conn, threading.Lock()

    def __call__(self, kind: str, payload: Any) -> None:
        with self.lock:
            self.conn.send((kind, payload))


class RecordSink:
    """Metric records, stamped with the time the rank wrote them, handed to ``put`` (on their way to the controller)
    instead of a local file."""

    def __init__(self, put: Callable[[dict[str, Any]], None]):
        self.put = put

    def write(self, record: dict[str, Any]) -> None:
        self.put({"time": time.time(), **record})

    def close(self) -> None:
        pass


def train_rank(job: Any, plan: Any, log: Callable[[str], None], put_record: Callable[[dict[str, Any]], None],
               hooks: Any, source: Any = None, running: Callable[[Any], None] | None = None) -> Any:
    """One rank's training, wherever it runs (the child process here, or an RL learner's actor thread): build the
    ``Trainer``, send again the records the lost attempt may not have delivered (the controller dedups), tell
    ``running``, fit, leave the process group; the ``RunResult``."""
    from distgpt.orchestrator.status import RunResult
    from distgpt.parallel.mesh import shutdown_distributed
    from distgpt.train.trainer import Trainer

    sink = RecordSink(put_record)
    trainer = Trainer(job, log=log, plan=plan, sink=sink, hooks=hooks, source=source)
    for rec in trainer.replay:
        sink.write({**rec, "replayed": True})
    if running is not None:
        running(trainer)
    res = trainer.fit()
    shutdown_distributed()
    return RunResult(res.steps, res.tokens_per_s, res.final_dir, res.loop_time, tuple(res.step_times))


def failure_text(e: BaseException) -> str:
    """A rank's exception as the controller reports it."""
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"


class _Hooks:
    """The trainer's step hooks: the rank's drills, and each step reported as soon as it is done (the controller's
    watchdog tells a slow step from a hung collective by it)."""

    def __init__(self, drills: Any, up: _Uplink):
        self.drills, self.up = drills, up

    def before_step(self, step: int) -> None:
        self.drills.before_step(step)

    def after_step(self, step: int) -> None:
        self.up("step", step)

    def checkpoint_due(self, step: int) -> bool:
        return self.drills.checkpoint_due(step)


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the actor's kill reaches only the actor
        pass
    if os.getppid() != parent:  # the actor died before the signal was armed
        os._exit(1)


def _listen(down: Connection, drills: Any) -> None:
    while True:
        try:
            kind, payload = down.recv()
        except (EOFError, OSError):
            return
        if kind == "arm":
            drills.arm(payload)
        elif kind == "checkpoint_at":
            drills.checkpoint_at(payload)


def child_main(up_fd: int, down_fd: int, parent: int) -> int:
    """Train one rank: wait for the job, run the ``Trainer``, report; the exit code says how it went."""
    _die_with_parent(parent)
    up, down = _Uplink(Connection(up_fd)), Connection(down_fd)
    kind, (job, plan, threads) = down.recv()
    assert kind == "start", kind
    from distgpt.orchestrator.drills import RankDrills

    drills = RankDrills(int(os.environ.get("RANK", "0")), lambda line: up("log", line))
    threading.Thread(target=_listen, args=(down, drills), daemon=True).start()

    def running(trainer: Any) -> None:
        up("step", trainer.step)  # where it starts (a resumed run: its checkpoint's step)
        up("state", "running")

    try:
        from distgpt.parallel.mesh import keep_gloo_on_loopback
        from distgpt.train.threads import use_threads

        keep_gloo_on_loopback()
        use_threads(threads)
        up("result", train_rank(job, plan, lambda line: up("log", line), lambda rec: up("record", rec),
                                _Hooks(drills, up), running=running))
        return 0
    except BaseException as e:  # reported to the controller, which decides what to do
        up("error", failure_text(e))
        return 1

if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
