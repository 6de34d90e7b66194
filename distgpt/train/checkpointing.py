"""A run's checkpoints, as the training loop sees them: when to save, what a save carries, how a run resumes.

The loop calls ``resume`` once before the first step and ``tick`` after every step; ``finish`` waits for the last
save. What a checkpoint holds besides the engine's state: the Plan, the model config, the loader's two integers, the
job (redacted), and rank 0's metric records since the previous commit (so a node lost before the driver saw them
loses no line of ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from distgpt import storage
from distgpt.checkpoint.manager import CheckpointManager
from distgpt.storage import StorageError

T = TypeVar("T")


class RunCheckpoints:
    """Save cadence, metadata, resume and the records a checkpoint carries, for one run on this rank."""

    def __init__(self, job, say: Callable[[str], None]):
        c = job.checkpoint
        self.job, self.say = job, say
        self.interval, self.async_save = c.interval, c.async_save
        if c.interval:  # an unwritable bucket fails now, not at the first save (an unreachable one is waited for)
            self._through_outage(lambda: storage.preflight(job.checkpoint_uri, attempts=1),
                                 "checking the checkpoint location")
        self.manager = CheckpointManager(job.checkpoint_uri, c.keep_last, c.keep_every, c.async_upload,
                                         c.trust_pickled_metadata)
        self.stalls: list[float] = []
        self.recent_records: list[dict] = []
        """Metric records (rank 0) newer than the last committed checkpoint: each save carries them."""

    @property
    def enabled(self) -> bool:
        """Whether this run saves checkpoints (checkpoint.interval > 0)."""
        return self.interval > 0

    def resume(self, engine, loader) -> tuple[int, list[dict]]:
        """Load the latest committed checkpoint into ``engine`` and ``loader`` when ``checkpoint.resume = "auto"``
        and one exists, resharded to this run's Plan. Returns (step to continue from, the records it carried)."""
        c = self.job.checkpoint
        if c.resume != "auto" or not self._through_outage(self.manager.committed, "listing checkpoints"):
            return 0, []
        manifest = self._through_outage(lambda: self.manager.load(engine, fallback=c.fallback), "resuming")
        loader.load_state_dict(manifest["loader"])
        self.say(f"resumed from step {manifest['step']} ({storage.redact(self.job.checkpoint_uri)}), saved under "
                 f"plan {manifest['plan_describe']}")
        return manifest["step"], manifest.get("records", [])

    def save(self, step: int, engine, meta: dict[str, Any], tokenizer_json: str) -> str:
        """Collective: write this step's sharded checkpoint (manifest last); in the background if configured.
        Returns a line for the log."""
        meta = {**meta, "records": list(self.recent_records)}
        prior = self.finish()  # the save still in flight: committed, or failed and reported (never raised)
        if prior:
            self.say(f"checkpoint {prior}")
        if not self.async_save:
            try:
                return self.manager.save(step, engine, meta, tokenizer_json)
            except StorageError as e:
                return self._failed(e)
        stall = self.manager.save_async(step, engine, meta, tokenizer_json)
        self.stalls.append(stall)
        return (f"snapshot started ({stall * 1e3:.1f} ms here; copied before the next optimizer step), uploading in "
                "the background — steps may run slower until the upload ends")

    def due(self, step: int, requested: bool) -> bool:
        """Whether to save after ``step``: at the interval, or when a driver asked (a preemption notice)."""
        return self.enabled and (step % self.interval == 0 or requested)

    def commit_finished(self) -> str | None:
        """Commit a finished background save (collective); forget the records it now covers."""
        try:
            done = self.manager.poll()
        except StorageError as e:
            done = self._failed(e)
        self.recent_records = [r for r in self.recent_records if r["step"] > self.manager.committed_step]
        return done

    def finish(self) -> str | None:
        """Wait for the last save: it is committed (or has failed, and says so) before the run reports success."""
        try:
            return self.manager.wait()
        except StorageError as e:
            return self._failed(e)

    def _failed(self, e: StorageError) -> str:
        """A save that failed after its retries: the run goes on; the line says what is still safe."""
        last = self.manager.committed_step
        kept = f"the latest commit is still step {last}" if last >= 0 else "nothing is committed yet"
        return f"FAILED — {e}; training continues and {kept} (the next save tries again)"

    def _through_outage(self, fn: Callable[[], T], what: str) -> T:
        """``fn``, retried while the checkpoint storage is unreachable (backoff 1 s … 30 s) for up to
        ``checkpoint.outage_wait_s``, saying so each time; anything else, or a longer outage, raises."""
        deadline, delay = time.monotonic() + self.job.checkpoint.outage_wait_s, 1.0
        while True:
            try:
                return fn()
            except StorageError as e:  # StorageIOError (unreachable) or preflight's StorageError (quoting it)
                left = deadline - time.monotonic()
                if not storage.is_transient(str(e)) or left <= 0:
                    raise
                self.say(f"checkpoint storage unreachable while {what} ({e}); retrying in {min(delay, left):.0f} s "
                         f"({left:.0f} s left of checkpoint.outage_wait_s)")
                time.sleep(min(delay, left))
                delay = min(2 * delay, 30.0)

    def keep(self, record: dict) -> None:
        """Remember a metric record until a checkpoint covers it."""
        if self.enabled:
            self.recent_records.append(record)


def checkpoint_meta(plan, gpt_cfg, loader, public_job: dict) -> dict[str, Any]:
    """What a checkpoint's manifest says besides its files."""
    return {"plan": json.loads(plan.to_json()), "plan_describe": plan.describe(), "model": gpt_cfg.to_dict(),
            "loader": loader.state_dict(), "job": public_job}
