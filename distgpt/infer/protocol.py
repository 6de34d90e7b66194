"""The OpenAI-compatible API as replies, whatever carries them: ``respond`` turns one HTTP request into a JSON reply or
a stream of server-sent events. ``infer/server.py`` (aiohttp, one process) and ``infer/ray_serve.py`` (a Ray Serve
deployment) are thin transports over it, so both answer every request byte for byte the same way.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``. With
``"stream": true`` the answer comes as server-sent events (one ``data:`` chunk per piece of text, then
``data: [DONE]``). Every request is an entry in the batcher, so concurrent requests share decode steps. A client that
goes away mid-answer is noticed at the next token (``gone()`` says so, or the transport cancels the event stream) and
its request is cancelled, freeing its slot and its place in the concurrency limit at once. Limits (prompt tokens, new
tokens, concurrent requests, body size) answer 400 / 429 / 413 with an error body naming the limit.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass

from distgpt.data.tokenizer import Tokenizer
from distgpt.infer.api import BadRequest, GenerationRequest, Limits, parse
from distgpt.infer.batcher import Batcher, Busy, Finished, Stream
from distgpt.infer.template import conversation_prompt
from distgpt.model.generate import IncrementalText

ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST"}
MAX_BODY = 1 << 20
"""The largest request body accepted, in bytes (a prompt is at most the model's context: far smaller)."""


@dataclass
class Service:
    """What the handlers share: the model's name, tokenizer, batcher and limits (``replica`` names this copy of the
    model when several serve it: Ray Serve's replica id, shown by ``/health``)."""

    name: str
    tok: Tokenizer
    batcher: Batcher
    limits: Limits
    created: int = 0
    replica: str = ""


@dataclass(frozen=True)
class JsonReply:
    """A whole answer: HTTP status and JSON body."""

    status: int
    body: dict


@dataclass(frozen=True)
class EventReply:
    """A streaming answer (status 200): ``events`` yields each server-sent event, encoded; a transport whose client
    left calls ``events.aclose()`` (or cancels the task iterating it), which cancels the request."""

    events: AsyncIterator[bytes]
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"))


def error(e: BadRequest) -> JsonReply:
    """The JSON reply for a refused request."""
    return JsonReply(e.status, e.body())


async def respond(svc: Service, method: str, path: str, read_body: Callable[[], Awaitable[bytes]],
                  gone: Callable[[], bool] = lambda: False) -> JsonReply | EventReply:
    """Answer one request. ``read_body`` returns the request body; ``gone`` says whether the client has left."""
    if path not in ROUTES:
        return error(BadRequest(f"no route {path}; routes: {', '.join(ROUTES)}", status=404, code="not_found"))
    if method != ROUTES[path]:
        return error(BadRequest(f"{method} is not allowed on {path} (use {ROUTES[path]})", status=405,
                                code="method_not_allowed"))
    if path == "/health":
        return JsonReply(200, {"status": "ok", "model": svc.name, "replica": svc.replica,
                               "open_requests": svc.batcher.open_requests, "ended": dict(svc.batcher.ended),
                               "limits": asdict(svc.limits)})
    if path == "/v1/models":
        return JsonReply(200, {"object": "list", "data": [
            {"id": svc.name, "object": "model", "created": svc.created, "owned_by": "distgpt"}]})
    try:
        return await _generate(svc, path == "/v1/chat/completions", await read_body(), gone)
    except BadRequest as e:
        return error(e)


def _json(raw: bytes) -> object:
    if len(raw) > MAX_BODY:
        raise BadRequest(f"the request body has {len(raw)} bytes; the server accepts at most {MAX_BODY}",
                         status=413, code="request_entity_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None


def _stream_for(svc: Service, req: GenerationRequest) -> tuple[Stream, IncrementalText]:
    """The batcher stream and text decoder of one request (its prompt checked against the limits)."""
    if req.messages is not None:
        p = conversation_prompt(svc.tok, req.messages)
        ids, stop, stop_ids = p.ids, p.stop + req.stop, p.stop_ids
    else:
        ids, stop, stop_ids = svc.tok.encode(req.prompt or ""), req.stop, frozenset()
    if len(ids) > svc.limits.max_prompt_tokens:
        raise BadRequest(f"the prompt has {len(ids)} tokens; the server's max_prompt_tokens limit is "
                         f"{svc.limits.max_prompt_tokens}", "messages" if req.messages else "prompt",
                         code="max_prompt_tokens_exceeded")
    if not ids:
        raise BadRequest("the prompt encodes to no tokens", "prompt")
    return Stream(ids, req.sampling, frozenset(stop_ids)), IncrementalText(svc.tok, stop, stop_ids)


async def _pieces(svc: Service, stream: Stream, text: IncrementalText, gone: Callable[[], bool]):
    """Text pieces as the batcher produces tokens; cancels the request if the client leaves or text stops."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    stream.sink = lambda item: loop.call_soon_threadsafe(items.put_nowait, item)
    try:
        svc.batcher.submit(stream)
    except Busy as e:
        raise BadRequest(str(e), None, status=429, code="max_concurrent_requests") from None
    except ValueError as e:
        raise BadRequest(str(e), "prompt", code="context_length_exceeded") from None
    try:
        while True:
            try:
                item = await asyncio.wait_for(items.get(), timeout=0.25)
            except asyncio.TimeoutError:
                item = None
            if gone():
                return
            if item is None:
                continue
            if isinstance(item, Finished):
                if item.reason == "error":
                    raise BadRequest(f"generation failed: {item.error}", status=500, code="generation_failed")
                tail = text.flush()
                if tail:
                    yield tail
                return
            piece = text.feed(item)
            if piece:
                yield piece
            if text.stopped:
                return
    finally:  # also on cancellation (a transport whose client left): the slot is freed now, not at the last token
        if stream.finished is None:
            stream.cancel()


def _choice(chat: bool, text: str, finish: str | None, delta: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    key = "delta" if delta else "message"
    body = {"content": text} if delta else {"role": "assistant", "content": text}
    return {"index": 0, key: body, "finish_reason": finish}


def _finish_reason(stream: Stream, text: IncrementalText) -> str:
    if text.stopped or (stream.finished and stream.finished.reason == "stop"):
        return "stop"
    return "length"


def _usage(stream: Stream) -> dict:
    return {"prompt_tokens": len(stream.prompt), "completion_tokens": stream.generated,
            "total_tokens": len(stream.prompt) + stream.generated}


async def _generate(svc: Service, chat: bool, raw: bytes, gone: Callable[[], bool]) -> JsonReply | EventReply:
    req = parse(_json(raw), chat, svc.limits)
    stream, text = _stream_for(svc, req)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": svc.name}
    pieces = _pieces(svc, stream, text, gone)
    if not req.stream:
        out = "".join([p async for p in pieces])
        return JsonReply(200, {**head, "choices": [_choice(chat, out, _finish_reason(stream, text), False)],
                               "usage": _usage(stream)})
    first = await anext(pieces, None)  # errors (429, 400) surface before the 200 is sent
    return EventReply(_events(chat, head, stream, text, first, pieces, req.include_usage))


async def _events(chat, head, stream, text, first, pieces, include_usage: bool) -> AsyncIterator[bytes]:
    """The answer as server-sent events (the first piece already in hand)."""
    if chat:
        head = {**head, "object": "chat.completion.chunk"}

    def event(payload: dict | str) -> bytes:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()

    try:
        if chat:
            yield event({**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        if first is not None:
            yield event({**head, "choices": [_choice(chat, first, None, True)]})
            async for piece in pieces:
                yield event({**head, "choices": [_choice(chat, piece, None, True)]})
        final = _choice(chat, "", _finish_reason(stream, text), True)
        if chat:
            final["delta"] = {}
        yield event({**head, "choices": [final]})
        if include_usage:
            yield event({**head, "choices": [], "usage": _usage(stream)})
        yield event("[DONE]")
    except BadRequest:  # generation failed mid-stream (the 200 is sent): end the stream
        return
    finally:
        await pieces.aclose()
