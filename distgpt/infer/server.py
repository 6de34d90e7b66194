"""``distgpt serve``: an OpenAI-compatible HTTP server in one process — aiohttp in front, the ``Batcher`` behind.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``. With
``"stream": true`` the answer comes as server-sent events (one ``data:`` chunk per piece of text, then
``data: [DONE]``). Every request is an entry in the batcher, so concurrent requests share decode steps. A client that
goes away mid-answer is noticed at the next token (the write fails, or the socket is seen closing) and its request
is cancelled, freeing its slot and its place in the concurrency limit at once. Limits (prompt tokens, new tokens,
concurrent requests) answer 400 / 429 with an error body naming the limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from aiohttp import web

from distgpt.data.tokenizer import Tokenizer
from distgpt.infer.api import BadRequest, GenerationRequest, Limits, parse
from distgpt.infer.batcher import Batcher, Busy, Finished, Stream
from distgpt.infer.template import conversation_prompt
from distgpt.model.generate import IncrementalText

ROUTES = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions")


@dataclass
class Service:
    """What the handlers share: the model's name, tokenizer, batcher and limits."""

    name: str
    tok: Tokenizer
    batcher: Batcher
    limits: Limits
    created: int = 0


SERVICE: web.AppKey[Service] = web.AppKey("service")


def _error(e: BadRequest) -> web.Response:
    return web.json_response(e.body(), status=e.status)


async def _body(request: web.Request) -> object:
    try:
        return await request.json()
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


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _pieces(request: web.Request, svc: Service, stream: Stream, text: IncrementalText):
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
            if _gone(request):
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
    finally:
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


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    svc: Service = request.app[SERVICE]
    try:
        req = parse(await _body(request), chat, svc.limits)
        stream, text = _stream_for(svc, req)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": svc.name}
        pieces = _pieces(request, svc, stream, text)
        if not req.stream:
            out = "".join([p async for p in pieces])
            return web.json_response({**head, "choices": [_choice(chat, out, _finish_reason(stream, text), False)],
                                      "usage": _usage(stream)})
        first = await anext(pieces, None)  # errors (429, 400) surface before the 200 is sent
    except BadRequest as e:
        return _error(e)
    return await _sse(request, chat, head, stream, text, first, pieces, req.include_usage)


def _usage(stream: Stream) -> dict:
    return {"prompt_tokens": len(stream.prompt), "completion_tokens": stream.generated,
            "total_tokens": len(stream.prompt) + stream.generated}


async def _sse(request, chat, head, stream, text, first, pieces, include_usage: bool) -> web.StreamResponse:
    """Send the answer as server-sent events (the first piece already in hand)."""
    if chat:
        head = {**head, "object": "chat.completion.chunk"}
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(payload: str) -> None:
        await resp.write(f"data: {payload}\n\n".encode())

    try:
        if chat:
            await send(json.dumps({**head, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                        "finish_reason": None}]}))
        if first is not None:
            await send(json.dumps({**head, "choices": [_choice(chat, first, None, True)]}))
            async for piece in pieces:
                await send(json.dumps({**head, "choices": [_choice(chat, piece, None, True)]}))
        final = _choice(chat, "", _finish_reason(stream, text), True)
        if chat:
            final["delta"] = {}
        await send(json.dumps({**head, "choices": [final]}))
        if include_usage:
            await send(json.dumps({**head, "choices": [], "usage": _usage(stream)}))
        await send("[DONE]")
    except (ConnectionError, BadRequest):  # the client left (or generation failed mid-stream): stop quietly
        await pieces.aclose()
        return resp
    await resp.write_eof()
    return resp


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _health(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    return web.json_response({"status": "ok", "model": svc.name, "open_requests": svc.batcher.open_requests,
                              "limits": asdict(svc.limits)})


async def _models(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    return web.json_response({"object": "list", "data": [
        {"id": svc.name, "object": "model", "created": svc.created, "owned_by": "distgpt"}]})


@web.middleware
async def _json_errors(request: web.Request, handler):
    """404 / 405 / 413 as JSON error bodies too (aiohttp answers them in plain text)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = {404: f"no route {request.path}; routes: {', '.join(ROUTES)}",
               405: f"{request.method} is not allowed on {request.path}"}.get(e.status, e.reason)
        return _error(BadRequest(msg, status=e.status, code=e.reason.lower().replace(" ", "_")))


def make_app(svc: Service, max_body: int = 1 << 20) -> web.Application:
    """The aiohttp application (``max_body``: the largest request body accepted, in bytes)."""
    app = web.Application(client_max_size=max_body, middlewares=[_json_errors])
    app[SERVICE] = svc
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    return app


async def _start(svc: Service, host: str, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(make_app(svc), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    return runner, f"http://{bound[0] if ':' not in bound[0] else f'[{bound[0]}]'}:{bound[1]}"


class Background:
    """A server on its own thread and event loop (tests, benchmarks, the chat's own server); ``stop`` ends it."""

    def __init__(self, svc: Service, host: str = "127.0.0.1", port: int = 0):
        self.svc = svc
        self.loop = asyncio.new_event_loop()
        started = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                started.set_result(self.loop.run_until_complete(_start(svc, host, port)))
            except BaseException as e:  # a port in use, say: raised to the caller below
                started.set_exception(e)
                return
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="distgpt-serve", daemon=True)
        self.thread.start()
        self._runner, self.url = started.result(timeout=60)

    def stop(self) -> None:
        """Close the listener and the loop (the batcher is the caller's)."""
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


def serve_forever(svc: Service, host: str, port: int, announce) -> None:
    """Serve until interrupted; ``announce(url)`` once the socket is listening."""

    async def main() -> None:
        runner, url = await _start(svc, host, port)
        announce(url)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
