"""A fault-injecting TCP proxy for object-storage drills: put it between distgpt and an S3-protocol server (both on
loopback) and make the storage slow, fail, reset connections or disappear — while a run saves and loads.

Modes (``FaultProxy.mode``, switchable at any time; a mode applies to every request that starts after the switch,
kept-alive connections included):

- ``pass``: forward bytes unchanged;
- ``slow``: forward, holding each response chunk back by ``delay_s``;
- ``error``: answer every request with an HTTP 503 (``status`` to change it) without forwarding it;
- ``reset``: read the request, then reset the connection (RST) — a network failure mid-request;
- ``down``: reset every connection as soon as it is made — the endpoint is gone.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from contextlib import suppress

MODES = ("pass", "slow", "error", "reset", "down")


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 (an ephemeral port) in front of ``upstream`` (host, port)."""

    def __init__(self, upstream: tuple[str, int], delay_s: float = 0.2, status: int = 503):
        self.upstream, self.delay_s, self.status = upstream, delay_s, status
        self.mode = "pass"
        self.requests: dict[str, int] = {m: 0 for m in MODES}
        """Requests (client chunks) seen in each mode: proof that a drill exercised what it meant to."""
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    @property
    def endpoint(self) -> str:
        """``host:port`` for an S3 URI's ``endpoint_override``."""
        return f"127.0.0.1:{self.port}"

    def set(self, mode: str) -> None:
        """Switch the fault mode (one of ``MODES``)."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; modes: {', '.join(MODES)}")
        self.mode = mode

    def close(self) -> None:
        """Stop accepting connections."""
        self._closed = True
        with suppress(OSError):
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "down":
                self.requests["down"] += 1
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            _reset(client)
            return
        threading.Thread(target=self._pump_back, args=(upstream, client), daemon=True).start()
        try:
            while chunk := client.recv(65536):
                mode = self.mode
                self.requests[mode] += 1
                if mode in ("reset", "down"):
                    _reset(client)
                    break
                if mode == "error":
                    body = f"HTTP/1.1 {self.status} Injected Fault\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    client.sendall(body.encode())
                    break
                upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                upstream.close()
            with suppress(OSError):
                client.close()

    def _pump_back(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := upstream.recv(65536):
                if self.mode == "slow":
                    time.sleep(self.delay_s)
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                client.shutdown(socket.SHUT_WR)


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0) rather than a clean FIN: what a dead peer or middlebox looks like."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with suppress(OSError):
        sock.close()
