"""``distgpt serve`` over a real socket: the OpenAI API, streaming, concurrency, cancellation, limits; the chat REPL."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time

import pytest

from distgpt.infer.api import Limits
from distgpt.infer.batcher import Batcher
from distgpt.infer.chat import HttpBackend, LocalBackend, repl
from distgpt.infer.runner import EngineSpec, Runner
from distgpt.infer.server import Background, Service
from distgpt.model.generate import SamplingConfig, generate_text
from tests.unit.test_infer import TOK, small_model

LIMITS = Limits(max_prompt_tokens=200, max_new_tokens=300, max_concurrent=6)


@pytest.fixture(scope="module")
def server():
    model = small_model(block=320)
    batcher = Batcher(Runner(model, EngineSpec("eager", max_batch=4)), LIMITS.max_concurrent)
    srv = Background(Service("tiny", TOK, batcher, LIMITS))
    yield srv, model
    srv.stop()
    batcher.close()


def _connect(srv) -> http.client.HTTPConnection:
    host, port = srv.url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def post(srv, path: str, body: object, raw: bytes | None = None) -> tuple[int, dict]:
    conn = _connect(srv)
    conn.request("POST", path, raw if raw is not None else json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def events(srv, path: str, body: dict) -> list[dict | str]:
    """The server-sent events of a streaming request, as they are read from the socket."""
    conn = _connect(srv)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    out: list[dict | str] = []
    for line in resp:
        if line.startswith(b"data: "):
            data = line[6:].strip()
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def test_completion_is_the_models_own_greedy_text(server):
    srv, model = server
    status, body = post(srv, "/v1/completions", {"prompt": "def main():", "max_tokens": 20, "temperature": 0})
    want = "".join(generate_text(model, TOK, "def main():", SamplingConfig(20, 0.0)))
    assert status == 200 and body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == want and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 20, "total_tokens": 31}


def test_streaming_sends_the_same_text_in_pieces_then_done(server):
    srv, _ = server
    body = {"prompt": "import os", "max_tokens": 30, "temperature": 0}
    whole = post(srv, "/v1/completions", body)[1]["choices"][0]["text"]
    chunks = events(srv, "/v1/completions", body)
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"][0]["finish_reason"] == "length"
    pieces = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert len([p for p in pieces if p]) > 3 and "".join(pieces) == whole


def test_chat_completion_uses_the_template_and_streams_deltas(server):
    srv, _ = server
    msgs = [{"role": "user", "content": "hello"}]
    status, body = post(srv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 12, "temperature": 0})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    chunks = events(srv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 12, "temperature": 0})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    assert streamed == body["choices"][0]["message"]["content"]


def test_models_and_health(server):
    srv, _ = server
    conn = _connect(srv)
    conn.request("GET", "/v1/models")
    assert json.loads(conn.getresponse().read())["data"][0]["id"] == "tiny"
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["limits"]["max_new_tokens"] == 300


def test_concurrent_requests_share_decode_steps_and_each_gets_its_own_answer(server):
    srv, _ = server
    prompts = ["a = ", "for ", "while ", "print("]
    alone = [post(srv, "/v1/completions", {"prompt": p, "max_tokens": 40, "temperature": 0})[1] for p in prompts]
    results: dict[int, dict] = {}
    steps = srv.svc.batcher.steps

    def ask(i: int) -> None:
        results[i] = post(srv, "/v1/completions", {"prompt": prompts[i], "max_tokens": 40, "temperature": 0})[1]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i]["choices"][0]["text"] for i in range(4)] == [a["choices"][0]["text"] for a in alone]
    assert srv.svc.batcher.steps - steps < 2 * 40, "four concurrent requests should have decoded together"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    srv, _ = server
    host, port = srv.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "x", "max_tokens": 300, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while b"data: " not in got:  # streaming has begun (headers and events may come in separate packets)
        got += sock.recv(65536)
    assert srv.svc.batcher.open_requests == 1
    cancelled = srv.svc.batcher.ended["cancelled"]
    sock.close()
    deadline = time.monotonic() + 5
    while srv.svc.batcher.open_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.svc.batcher.open_requests == 0, "the abandoned request still holds its slot"
    assert srv.svc.batcher.ended["cancelled"] == cancelled + 1  # cancelled, not run to its 300 tokens


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"prompt": "x", "max_tokens": 301}, 400, "max_new_tokens limit is 300"),
    ({"prompt": "x" * 201}, 400, "max_prompt_tokens limit is 200"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature must be between"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p must be between"),
    ({"prompt": ""}, 400, "prompt must be a non-empty string"),
    ({"prompt": "x", "n": 2}, 400, "n must be"),
    ({"prompt": "x", "max_tokns": 3}, 400, "unknown field(s) ['max_tokns']"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(server, body, status, says):
    got, err = post(server[0], "/v1/completions", body)
    assert got == status and says in err["error"]["message"]


def test_malformed_json_unknown_routes_and_methods(server):
    srv, _ = server
    assert post(srv, "/v1/completions", None, raw=b"{not json")[1]["error"]["message"].startswith("the request body")
    assert post(srv, "/v1/nothing", {})[0] == 404
    conn = _connect(srv)
    conn.request("GET", "/v1/completions")
    assert conn.getresponse().status == 405


def test_more_than_max_concurrent_requests_get_429(server):
    srv, _ = server
    socks = []
    host, port = srv.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "y", "max_tokens": 300, "stream": True}).encode()
    try:
        for _ in range(LIMITS.max_concurrent):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            socks.append(s)
        deadline = time.monotonic() + 10
        while srv.svc.batcher.open_requests < LIMITS.max_concurrent and time.monotonic() < deadline:
            time.sleep(0.01)
        status, err = post(srv, "/v1/completions", {"prompt": "z", "max_tokens": 2})
        assert status == 429 and "max_concurrent_requests (6)" in err["error"]["message"]
    finally:
        for s in socks:
            s.close()


class _InterruptAfter(io.StringIO):
    """Output that raises KeyboardInterrupt — what Ctrl-C does — while the n-th piece of an answer is written."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.armed = n, False

    def write(self, s: str) -> int:
        if s == "bot> ":
            self.armed = True
        elif self.armed and s and s not in ("\n", " [stopped]"):
            self.n -= 1
            if self.n == 0:
                self.armed = False
                raise KeyboardInterrupt
        return super().write(s)


def test_chat_keeps_the_conversation_and_ctrl_c_stops_only_the_answer():
    model = small_model(block=320)
    batcher = Batcher(Runner(model, EngineSpec("eager", max_batch=1)))
    backend = LocalBackend(batcher, TOK, "tiny")
    seen: list[list] = []
    reply = backend.reply
    backend.reply = lambda msgs, t, m: (seen.append(list(msgs)), reply(msgs, t, m))[1]
    lines = iter(["hello", "/temp 0", "and again", "/reset", "fresh", "/max 0", "/quit"])
    out = _InterruptAfter(3)
    try:
        assert repl(backend, read=lambda _: next(lines), out=out, max_tokens=100) == 0
    finally:
        batcher.close()
    text = out.getvalue()
    assert "[stopped]" in text and "(temperature = 0.0)" in text and "(conversation cleared)" in text
    assert "(/max takes a positive number" in text
    assert [len(m) for m in seen] == [1, 3, 1]  # the 2nd turn carried the 1st (its answer cut short), not the 3rd
    assert seen[1][1][0] == "assistant" and seen[1][1][1]  # the partial answer stayed in the conversation
    assert batcher.open_requests == 0, "the interrupted answer's generation was not cancelled"


def test_chat_against_a_server(server):
    srv, _ = server
    lines = iter(["hi", "/quit"])
    out = io.StringIO()
    assert repl(HttpBackend(srv.url), read=lambda _: next(lines), out=out, temperature=0, max_tokens=8) == 0
    answer = out.getvalue().split("bot> ", 1)[1].split("\n", 1)[0]
    assert "chatting with tiny at" in out.getvalue() and answer.strip(), "the server's answer was not shown"


def test_chat_names_an_unreachable_server():
    from distgpt.infer.chat import ChatError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ChatError, match=f"no distgpt server answers at http://127.0.0.1:{port}"):
        HttpBackend(f"http://127.0.0.1:{port}")
