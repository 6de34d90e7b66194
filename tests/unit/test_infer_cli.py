"""``distgpt export / generate / serve / chat`` as a user runs them: real processes, real sockets."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys

import pytest

from distgpt.checkpoint.export import save_model_dir
from tests.unit.test_infer import TOK, small_model


def cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distgpt", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cli-model"))
    model = small_model(block=128)
    save_model_dir(out, model, model.cfg, TOK)
    return out


def test_export_int8_then_generate_prints_new_text(model_dir, tmp_path):
    art = str(tmp_path / "art")
    p = cli("export", model_dir, "--out", art, "--quantize", "int8")
    assert p.returncode == 0, p.stderr
    assert "int8" in p.stdout and "greedy agreement with fp32" in p.stdout
    g = cli("generate", "--checkpoint", art, "--prompt", "def f():", "--max-new-tokens", "20", "--temperature", "0")
    assert g.returncode == 0, g.stderr
    out = g.stdout.rstrip("\n")
    assert out.startswith("def f():") and len(out) > len("def f():") + 5, "no tokens were generated"


def test_generate_refuses_nonsense_sampling_settings(model_dir):
    p = cli("generate", "--checkpoint", model_dir, "--top-p", "0", "--temperature", "-1", "--max-new-tokens", "-3")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    for flag in ("--max-new-tokens", "--temperature", "--top-p"):
        assert flag in p.stderr


def test_serve_answers_on_loopback_and_stops_on_ctrl_c(model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "distgpt", "serve", model_dir, "--engine", "eager", "--port", "0",
                             "--name", "m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert "serving m on http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "x = ", "max_tokens": 5, "temperature": 0}))
        body = json.loads(conn.getresponse().read())
        assert body["usage"]["completion_tokens"] == 5
        chat = cli("chat", "--server", f"http://127.0.0.1:{port}", "--max-tokens", "5", stdin="hello\n/quit\n")
        answer = chat.stdout.split("bot> ", 1)[1].split("\n", 1)[0]
        assert chat.returncode == 0 and "chatting with m at" in chat.stdout and answer.strip(), chat.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_chat_in_process_reads_turns_from_stdin(model_dir):
    p = cli("chat", model_dir, "--engine", "eager", "--max-tokens", "8", stdin="hi\n/temp 0\nagain\n/reset\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("bot> ") == 2 and "(temperature = 0.0)" in p.stdout and "(conversation cleared)" in p.stdout


def test_serve_refuses_bad_options_without_a_traceback(model_dir):
    p = cli("serve", model_dir, "--engine", "eager", "--host", "localhost-ish", "--max-batch", "0")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--host 'localhost-ish' is not an IP address" in p.stderr and "--max-batch must be positive" in p.stderr


@pytest.mark.parametrize(("flags", "says"), [
    (["--autoscale", "3-1"], "need 1 <= MIN <= MAX, got 3-1"),
    (["--autoscale", "two"], "--autoscale takes MIN-MAX replicas"),
    (["--replica-cpus", "0"], "--replica-cpus must be positive"),
    (["--no-ray", "--replicas", "2"], "--replicas only apply with --ray"),
])
def test_serve_on_ray_refuses_bad_scaling_before_starting_ray(model_dir, flags, says):
    ray = [] if "--no-ray" in flags else ["--ray"]
    p = cli("serve", model_dir, *ray, "--engine", "eager", *[f for f in flags if f != "--no-ray"])
    assert p.returncode == 2 and "Traceback" not in p.stderr and says in p.stderr, p.stderr
    assert "Started a local Ray instance" not in p.stderr  # refused before a cluster was started
