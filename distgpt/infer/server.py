"""``distgpt serve`` in one process: aiohttp carries the replies ``infer/protocol.py`` makes, the ``Batcher`` behind.

``infer/ray_serve.py`` carries the same replies through Ray Serve (replicas, autoscaling); what a client sees is the
same. Here a client that goes away is noticed by its socket closing (``gone``) or the failed write of an event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from aiohttp import web

from distgpt.infer.api import BadRequest
from distgpt.infer.protocol import MAX_BODY, EventReply, JsonReply, Service, error, respond

__all__ = ["Background", "Service", "make_app", "serve_forever"]

SERVICE: web.AppKey[Service] = web.AppKey("service")


def _json(reply: JsonReply) -> web.Response:
    return web.json_response(reply.body, status=reply.status)


async def _handle(request: web.Request) -> web.StreamResponse:
    """Every route: the protocol's reply, carried by aiohttp."""

    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    reply = await respond(request.app[SERVICE], request.method, request.path, request.read, gone)
    if isinstance(reply, JsonReply):
        return _json(reply)
    return await _stream(request, reply)


async def _stream(request: web.Request, reply: EventReply) -> web.StreamResponse:
    resp = web.StreamResponse(headers=dict(reply.headers))
    await resp.prepare(request)
    try:
        async for chunk in reply.events:
            await resp.write(chunk)
    except ConnectionError:  # the client left: closing the events cancels its request
        await reply.events.aclose()
        return resp
    await resp.write_eof()
    return resp


@web.middleware
async def _json_errors(request: web.Request, handler):
    """aiohttp's own refusals (a body over ``client_max_size``: 413) as JSON error bodies too."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _json(error(BadRequest(e.reason, status=e.status, code=e.reason.lower().replace(" ", "_"))))


def make_app(svc: Service, max_body: int = MAX_BODY) -> web.Application:
    """The aiohttp application (``max_body``: the largest request body accepted, in bytes)."""
    app = web.Application(client_max_size=max_body, middlewares=[_json_errors])
    app[SERVICE] = svc
    app.router.add_route("*", "/{tail:.*}", _handle)
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
