"""Iteration-level batching: one thread runs the model; requests join the running batch at the next decode step and
leave it the step they finish (Orca, Yu et al. 2022; "continuous batching").

Each step the loop (1) admits waiting requests into free cache slots, prefilling each and sampling its first token,
then (2) decodes one token for every active request at once. A request leaves when it samples one of its stop tokens,
reaches its token budget or the model's context, or is cancelled — its slot is free for the next step's admissions.
Consumers read a ``Stream`` (blocking iteration, or a callback for an event loop); the batcher never waits on them.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from distgpt.errors import DistgptError
from distgpt.infer.runner import Runner
from distgpt.model.generate import SamplingConfig, TextCodec, sample_next, stream_text
from distgpt.train.threads import adopt_process_threads


class Busy(DistgptError):
    """The server already holds its maximum of concurrent requests."""


@dataclass(frozen=True)
class Finished:
    """The end of a stream: why it ended ('stop', 'length', 'cancelled' or 'error') and, for errors, what."""

    reason: str
    error: str = ""


@dataclass
class Stream:
    """The tokens of one request, in order, then one ``Finished``. Iterate it (blocking), or pass ``sink``."""

    prompt: list[int]
    sampling: SamplingConfig
    stop_ids: frozenset[int] = frozenset()
    sink: Callable[[int | Finished], None] | None = None
    """Called from the batcher's thread with each token and the final ``Finished`` (instead of the queue)."""
    generated: int = 0
    finished: Finished | None = None
    _queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _on_close: Callable[[Stream], None] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop generating: the slot is released at the batcher's next step (and the count of open requests now)."""
        self._cancelled.set()
        self._close()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _close(self) -> None:
        hook, self._on_close = self._on_close, None
        if hook is not None:
            hook(self)

    def _push(self, item: int | Finished) -> None:
        if isinstance(item, Finished):
            self.finished = item
            self._close()
        else:
            self.generated += 1
        (self.sink or self._queue.put)(item)

    def __iter__(self) -> Iterator[int]:
        """Token ids as they come; raises ``RuntimeError`` if generation failed."""
        while True:
            item = self._queue.get()
            if isinstance(item, Finished):
                if item.reason == "error":
                    raise RuntimeError(item.error)
                return
            yield item


@dataclass
class _Active:
    stream: Stream
    slot: int
    pos: int
    """Position of ``last`` (the token fed at the next step)."""
    last: int
    gen: torch.Generator | None


class Batcher:
    """Runs ``runner`` on a background thread for every submitted ``Stream``; ``max_open`` bounds requests that are
    running or waiting (``submit`` raises ``Busy`` beyond it)."""

    def __init__(self, runner: Runner, max_open: int = 64):
        self.runner = runner
        self.max_open = max_open
        self._open = 0
        self._waiting: deque[Stream] = deque()
        self._slots: list[_Active | None] = [None] * runner.spec.max_batch
        self._lock = threading.Condition()
        self._closed = False
        self.steps = 0
        """Decode steps run (each serves every active request at once)."""
        self.ended: Counter[str] = Counter()
        """Requests ended, by why: stop, length, cancelled (the client left, or a stop sequence), error."""
        self._thread = threading.Thread(target=self._loop, name="distgpt-batcher", daemon=True)
        self._thread.start()

    @property
    def open_requests(self) -> int:
        """Requests running or waiting."""
        return self._open

    def submit(self, stream: Stream) -> Stream:
        """Queue a request; it joins the batch at the next step."""
        if not stream.prompt:
            raise ValueError("the prompt encodes to no tokens; give at least one character")
        if len(stream.prompt) >= self.runner.block_size:
            raise ValueError(f"the prompt has {len(stream.prompt)} tokens; the model's context is "
                             f"{self.runner.block_size}, so a prompt may have at most {self.runner.block_size - 1}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._open >= self.max_open:
                raise Busy(f"max_concurrent_requests ({self.max_open}) reached; retry when a request finishes")
            self._open += 1
            stream._on_close = self._release
            self._waiting.append(stream)
            self._lock.notify()
        return stream

    def _release(self, stream: Stream) -> None:
        with self._lock:
            self._open -= 1
            self.ended[stream.finished.reason if stream.finished else "cancelled"] += 1
            self._lock.notify()

    def close(self) -> None:
        """Stop the loop; open requests end as cancelled."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        adopt_process_threads()  # this thread runs the model; a count set elsewhere (a Serve replica) stops short of it
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not any(self._slots):
                    self._lock.wait()
                if self._closed:
                    break
            try:
                self._admit()
                if any(self._slots):
                    self._step()
            except Exception as e:  # a failed step fails its requests, not the server
                for i, a in enumerate(self._slots):
                    if a is not None:
                        a.stream._push(Finished("error", f"{type(e).__name__}: {e}"))
                        self._slots[i] = None
        for a in [*filter(None, self._slots), *self._waiting]:
            a = a.stream if isinstance(a, _Active) else a
            if a.finished is None:
                a._push(Finished("cancelled"))

    def _admit(self) -> None:
        """Prefill waiting requests into free slots (lowest first, so a decode step covers few rows)."""
        while True:
            with self._lock:
                free = next((i for i, a in enumerate(self._slots) if a is None), None)
                if free is None or not self._waiting:
                    return
                stream = self._waiting.popleft()
            if stream.cancelled:
                stream._push(Finished("cancelled"))
                continue
            cfg = stream.sampling
            gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
            logits = self.runner.prefill(free, stream.prompt)
            active = _Active(stream, free, len(stream.prompt), 0, gen)
            self._slots[free] = active
            self._emit(active, logits)

    def _step(self) -> None:
        """One decode step for every active slot."""
        top = max(i for i, a in enumerate(self._slots) if a is not None) + 1
        rows = self._slots[:top]
        for i, a in enumerate(rows):
            if a is not None and a.stream.cancelled:
                a.stream._push(Finished("cancelled"))
                self._slots[i] = None
        if not any(self._slots):
            return
        top = max(i for i, a in enumerate(self._slots) if a is not None) + 1
        rows = self._slots[:top]
        logits = self.runner.decode([a.last if a else 0 for a in rows], [a.pos if a else 0 for a in rows])
        self.steps += 1
        for a in rows:
            if a is not None:
                a.pos += 1
                self._emit(a, logits[a.slot])

    def _emit(self, a: _Active, logits: torch.Tensor) -> None:
        """Sample the next token of ``a`` from ``logits`` (V,), hand it over, and retire ``a`` if it is done."""
        s = a.stream
        tok = int(sample_next(logits.view(1, -1), s.sampling, a.gen).item())
        if tok in s.stop_ids:
            reason = "stop"
        else:
            s._push(tok)
            a.last = tok
            done = s.generated >= s.sampling.max_new_tokens or a.pos >= self.runner.block_size  # no room to feed it
            reason = "length" if done else ""
        if reason:
            s._push(Finished(reason))
            self._slots[a.slot] = None


def generate_text(batcher: Batcher, codec: TextCodec, ids: list[int], sampling: SamplingConfig,
                  stop: tuple[str, ...] = (), stop_ids: frozenset[int] = frozenset()) -> Iterator[str]:
    """Submit one request and stream its text (``model.generate.stream_text``); closing the iterator, or a stop
    sequence, cancels the generation."""
    stream = batcher.submit(Stream(ids, sampling, stop_ids))

    def pieces() -> Iterator[str]:
        try:
            yield from stream_text(codec, stream, stop, stop_ids)
        finally:
            stream.cancel()

    return pieces()
