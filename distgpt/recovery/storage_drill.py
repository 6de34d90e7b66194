"""``distgpt drill storage``: a job's checkpoint store, failing on purpose while a short run saves and resumes.

The job's ``checkpoint.uri`` must name an S3-compatible endpoint (``?endpoint_override=HOST:PORT``): a
``FaultProxy`` is put in front of it and the run talks to the proxy. Two acts:

1. **save under faults** — the store answers 503 (or resets connections) for one save: that save fails after its
   retries, training goes on, the next save commits, every commit verifies whole;
2. **resume in an outage** — the store is gone when a new run starts: the run waits and says so, the store comes
   back, the run resumes from the last commit (a partial save written meanwhile is never loaded) and finishes.

Each act prints what happened and how long it took; the drill fails (exit 1) if any expectation does not hold.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from distgpt import storage
from distgpt.checkpoint.manager import CheckpointManager
from distgpt.config import JobConfig
from distgpt.config_schema import ConfigError
from distgpt.errors import RunFailed
from distgpt.recovery.storage_faults import FaultProxy


@dataclass
class Act:
    """One part of the drill and whether it held."""

    name: str
    ok: bool
    detail: str
    seconds: float


def _via_proxy(uri: str) -> tuple[tuple[str, int], Callable[[str], str]]:
    """(the endpoint's (host, port), a function giving the same URI through a proxy at another endpoint)."""
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    endpoint = query.get("endpoint_override", "")
    if parts.scheme != "s3" or ":" not in endpoint:
        raise ConfigError(["checkpoint.uri: the storage drill needs an S3-compatible endpoint you run, named in the "
                           "URI (s3://BUCKET/PATH?endpoint_override=HOST:PORT&scheme=http) — it puts a fault proxy "
                           "in front of it"], "drill storage")
    host, port = endpoint.rsplit(":", 1)

    def through(proxy_endpoint: str) -> str:
        q = urlencode({**query, "endpoint_override": proxy_endpoint}, safe=":/")
        return urlunsplit((parts.scheme, parts.netloc, parts.path, q, parts.fragment))

    return (host, int(port)), through


def run_storage_drill(job: JobConfig, log: Callable[[str], None] = print, fault: str = "error") -> list[Act]:
    """Both acts against ``job``'s checkpoint store (each under its own sub-path); returns what happened."""
    upstream, through = _via_proxy(job.checkpoint_uri)
    acts: list[Act] = []
    with FaultProxy(upstream) as proxy:
        root = storage.join(through(proxy.endpoint), f"drill-{int(time.time())}")
        base = dataclasses.replace(job, checkpoint=dataclasses.replace(
            job.checkpoint, uri=root, interval=2, async_save=False, resume="auto"),
            train=dataclasses.replace(job.train, max_steps=6, eval_interval=0, progress=False))
        acts.append(_act_save(base, proxy, fault, log))
        acts.append(_act_outage(base, proxy, log))
    return acts


class _NoMetrics:
    """A metrics sink that keeps nothing: given a sink, the trainer sends its messages to ``log`` (not a bar)."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class ModeSwitch:
    """Step hooks (``train.trainer.StepHooks``) that set a proxy's mode before given steps (``{step: mode}``)."""

    def __init__(self, proxy: FaultProxy, at: dict[int, str]):
        self.proxy, self.at = proxy, at

    def before_step(self, step: int) -> None:
        if step in self.at:
            self.proxy.set(self.at[step])

    def checkpoint_due(self, step: int) -> bool:
        return False

    def after_step(self, step: int) -> None:
        pass


def _act_save(job: JobConfig, proxy: FaultProxy, fault: str, log) -> Act:
    from distgpt.train.trainer import Trainer

    t0, lines = time.perf_counter(), []
    out = dataclasses.replace(job, run=dataclasses.replace(job.run, out_dir=f"{job.out_dir}/drill-save"))
    res = Trainer(out, log=lines.append, sink=_NoMetrics(), hooks=ModeSwitch(proxy, {2: fault, 4: "pass"})).fit()
    steps = [c.step for c in CheckpointManager(out.checkpoint_uri).committed()]
    failed = [ln for ln in lines if "FAILED" in ln]
    ok = res.steps == 6 and steps == [2, 6] and bool(failed) and proxy.requests[fault] > 0
    detail = (f"store answered '{fault}' during step 4's save: {'it failed, training went on' if failed else 'NO '}"
              f"{'' if failed else 'failure reported'}; commits {steps} (want [2, 6]); run finished at step "
              f"{res.steps}")
    log(f"[drill] save under faults: {'ok' if ok else 'FAILED'} — {detail}")
    return Act("save under faults", ok, detail, time.perf_counter() - t0)


def _act_outage(job: JobConfig, proxy: FaultProxy, log) -> Act:
    from distgpt.train.trainer import Trainer

    t0, lines = time.perf_counter(), []
    out = dataclasses.replace(job, run=dataclasses.replace(job.run, out_dir=f"{job.out_dir}/drill-save"),
                              train=dataclasses.replace(job.train, max_steps=8))
    storage.write_bytes(storage.join(out.checkpoint_uri, "step-00000099", "__0_0.distcp"), b"partial")
    proxy.set("down")
    back: list[float] = []

    def say(line: str) -> None:
        lines.append(line)
        if "unreachable" in line and not back:  # the store returns a second after the run says it is waiting
            back.append(time.perf_counter())
            threading.Timer(1.0, proxy.set, args=("pass",)).start()

    trainer = Trainer(out, log=say, sink=_NoMetrics())
    resumed, waited = trainer.step, [ln for ln in lines if "unreachable" in ln]
    res = trainer.fit()
    ok = bool(waited) and resumed == 6 and res.steps == 8
    detail = (f"store down at start: the run {'waited and said so' if waited else 'did NOT wait'} "
              f"({len(waited)} message(s)), resumed from step {resumed} (want 6; a partial step 99 was ignored), "
              f"finished at step {res.steps}")
    log(f"[drill] resume in an outage: {'ok' if ok else 'FAILED'} — {detail}")
    return Act("resume in an outage", ok, detail, time.perf_counter() - t0)


def check(acts: list[Act]) -> None:
    """RunFailed naming every act that did not hold."""
    bad = [a for a in acts if not a.ok]
    if bad:
        raise RunFailed("storage drill: " + "; ".join(f"{a.name}: {a.detail}" for a in bad))
