"""``distgpt serve --ray``: the model as a Ray Serve deployment on the session's cluster — the CLI as a user runs it
(replicas, the OpenAI API, streaming, bad input, Ctrl-C removes the app), a client that leaves frees its slot,
Serve's autoscaler adds a replica under load and removes it after; and the embedded cluster stays on loopback."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from distgpt.checkpoint.export import save_model_dir
from distgpt.infer.options import ServeSpec
from tests.unit.test_infer import TOK, small_model

from .ray_cluster import _free_port as free_port

pytestmark = pytest.mark.timeout(600)


def _saved(tmp_path_factory, name: str, block: int) -> str:
    out = str(tmp_path_factory.mktemp("served") / name)
    model = small_model(block=block)
    save_model_dir(out, model, model.cfg, TOK)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "tiny", 320)


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """A context long enough that an answer takes seconds, so a disconnect comes well before its end."""
    return _saved(tmp_path_factory, "long", 4096)


@pytest.fixture(scope="module")
def port(ray_cluster):
    """Serve on the session's cluster with its proxy on this port (Serve's HTTP address is fixed per cluster), shut
    down after this module so its actors leave the cluster's CPUs free."""
    from ray import serve

    p = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": p})
    yield p
    serve.shutdown()


def _request(port: int, method: str, path: str, body: object = None, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method, path, data, {"Content-Type": "application/json"} if data is not None else {})
    return conn, conn.getresponse()


def call(port: int, method: str, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict]:
    conn, resp = _request(port, method, path, body, raw)
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def streamed(port: int, body: dict) -> list[str]:
    """The text pieces of a streaming completion, read event by event from the socket; ends at [DONE]."""
    conn, resp = _request(port, "POST", "/v1/completions", {**body, "stream": True})
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    pieces = []
    for line in resp:
        if line.startswith(b"data: "):
            data = line[6:].strip()
            if data == b"[DONE]":
                conn.close()
                return pieces
            pieces.append(json.loads(data)["choices"][0]["text"])
    raise AssertionError("the stream ended without [DONE]")


def _start_cli(model_dir: str, address: str, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distgpt", "serve", model_dir, "--ray", f"--address={address}", "--engine=eager",
           f"--port={port}", "--replica-cpus=0.5", "--name=tiny", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_serving(proc: subprocess.Popen, timeout: float = 240) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"serve exited ({proc.poll()}) before serving:\n{''.join(lines)[-4000:]}")
        lines.append(line)
        if line.startswith("serving tiny on http://127.0.0.1:"):
            return lines
    raise AssertionError("not serving in time:\n" + "".join(lines)[-4000:])


def test_serve_ray_cli_replicas_streaming_bad_input_and_ctrl_c(ray_cluster, port, model_dir):
    from ray import serve

    from distgpt.model.generate import SamplingConfig, generate_text

    proc = _start_cli(model_dir, ray_cluster.cluster.address, port, "--replicas=2")
    try:
        lines = _wait_serving(proc)
        assert "(2 replica(s) running)" in lines[-1], lines[-1]
        seen = {call(port, "GET", "/health")[1]["replica"] for _ in range(30)}
        assert len(seen) == 2, f"requests reached replicas {seen}"  # Serve spreads requests over both
        # the same greedy text as the model in this process, sent piece by piece
        greedy = SamplingConfig(max_new_tokens=24, temperature=0)
        want = "".join(generate_text(small_model(block=320), TOK, "The ", greedy))
        pieces = streamed(port, {"prompt": "The ", "max_tokens": 24, "temperature": 0})
        assert len(pieces) > 1 and "".join(pieces) == want
        status, body = call(port, "POST", "/v1/completions", {"prompt": "The ", "max_tokens": 24, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == want and body["model"] == "tiny"
        # concurrent clients all get whole answers
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(len(streamed(port, {"prompt": "And ",
                   "max_tokens": 40, "temperature": 0.8, "seed": 1})))) for _ in range(8)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert len(results) == 8 and all(n > 0 for n in results)
        # bad input: the same JSON errors as the one-process server
        assert call(port, "POST", "/v1/completions", raw=b"{nope")[0] == 400
        status, body = call(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 10_000})
        assert status == 400 and body["error"]["code"] == "max_new_tokens_exceeded"
        status, body = call(port, "GET", "/v2/nothing")
        assert status == 404 and "/v1/completions" in body["error"]["message"]
        assert call(port, "GET", "/v1/completions")[0] == 405
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "tiny" not in serve.status().applications  # Ctrl-C removed the app


def test_serve_ray_a_client_that_leaves_frees_its_slot(port, long_model_dir):
    from ray import serve

    from distgpt.infer.options import InferError, ServeSpec
    from distgpt.infer.ray_serve import Scaling, deploy

    spec = ServeSpec(long_model_dir, "eager", max_batch=2, name="leaver")
    with pytest.raises(InferError, match=f"proxy on 127.0.0.1:{port}"):  # Serve's address is the cluster's
        deploy(spec, Scaling(cpus=0.5), "127.0.0.1", free_port())
    deployed = deploy(spec, Scaling(cpus=0.5), "127.0.0.1", port)
    try:
        body = json.dumps({"prompt": "The ", "max_tokens": 4000, "temperature": 0.8, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: " not in got:  # generating (headers and events may come in separate packets)
            got += sock.recv(65536)
        health = call(port, "GET", "/health")[1]
        assert health["open_requests"] == 1 and not health["ended"]
        sock.close()  # the client goes away mid-answer
        deadline = time.monotonic() + 30
        while call(port, "GET", "/health")[1]["open_requests"] and time.monotonic() < deadline:
            time.sleep(0.1)
        health = call(port, "GET", "/health")[1]
        # freed by the disconnect, not by running to its 300 tokens
        assert health["open_requests"] == 0 and health["ended"] == {"cancelled": 1}, health
    finally:
        serve.delete(deployed.app)


def test_serve_ray_autoscales_up_under_load_and_back_down(port, long_model_dir):
    from ray import serve

    from distgpt.infer.ray_serve import Scaling, deploy, replicas

    # one cache slot per replica: two clients streaming at once are more than one replica is sized for
    scaling = Scaling(min_replicas=1, max_replicas=2, cpus=0.5, upscale_delay_s=0.5, downscale_delay_s=2.0)
    deployed = deploy(ServeSpec(long_model_dir, "eager", max_batch=1, name="scaler"), scaling, "127.0.0.1", port)
    stop = threading.Event()
    answered: list[int] = []

    def client() -> None:
        while not stop.is_set():
            answered.append(len(streamed(port, {"prompt": "The ", "max_tokens": 400, "temperature": 0.8})))

    try:
        assert replicas(deployed.app) == 1
        load = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        [t.start() for t in load]
        deadline = time.monotonic() + 120
        while replicas(deployed.app) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replicas(deployed.app) == 2, "Serve did not add a replica under load"
        stop.set()
        [t.join(120) for t in load]
        assert answered and all(n > 0 for n in answered)
        deadline = time.monotonic() + 120
        while replicas(deployed.app) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replicas(deployed.app) == 1, "Serve did not remove the idle replica"
    finally:
        stop.set()
        serve.delete(deployed.app)
