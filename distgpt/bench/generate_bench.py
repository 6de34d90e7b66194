"""``distgpt bench generate``: decode speed of each engine at batch 1, and the server under concurrent load.

Part 1 runs, in one process and interleaved round by round (so drift of the machine's speed hits every engine alike):
``eager`` — ``GPT.forward`` with its growing KV cache, the reference; ``static`` — the static-cache decoder run op by
op; ``compiled`` — the same through torch.compile; ``int8`` — compiled with torchao weight-only int8. Each round
generates the same greedy tokens from the same prompt; the table shows the median tokens/s over rounds with the
spread (min–max), time to first token, the median of the per-round ratios to eager, and compile time. int8's greedy
agreement with fp32 is measured teacher-forced over ``artifact.PROBE_PROMPTS``.

Part 2 starts a real ``distgpt serve`` process (compiled, every batch bucket warmed before timing) and drives it from
this process with 1, 8 and 32 concurrent clients, streaming and not: total generated tokens/s, time to first token
(streaming: first text chunk; non-streaming: the whole answer is the first thing a client sees) p50/p99.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from distgpt.model.config import GPTConfig

PROMPT = "It was the best of times, it was the worst of times, it was the age of"


def _model(args):
    from distgpt.data.tokenizer import ByteTokenizer
    from distgpt.infer.artifact import read_model
    from distgpt.model.gpt import GPT

    if args.checkpoint:
        return read_model(args.checkpoint)[:2]
    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=args.layers, n_head=max(1, args.width // 64),
                    n_embd=args.width)
    return GPT(cfg).eval(), tok


def _eager(model, prompt: list[int], n: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s after it) of ``GPT.forward`` with its growing cache."""
    from distgpt.model.generate import SamplingConfig, generate_ids

    start = time.perf_counter()
    it = generate_ids(model, prompt, SamplingConfig(n, 0.0))
    next(it)
    first = time.perf_counter()
    rest = sum(1 for _ in it)
    return first - start, rest / (time.perf_counter() - first)


def _runner_speed(runner, prompt: list[int], n: int) -> tuple[float, float]:
    start = time.perf_counter()
    logits = runner.prefill(0, prompt)
    tok = int(logits.argmax())
    first = time.perf_counter()
    for i in range(n - 1):
        tok = int(runner.decode([tok], [len(prompt) + i])[0].argmax())
    return first - start, (n - 1) / (time.perf_counter() - first)


def _linears_alone(model, qmodel, rounds: int = 20) -> tuple[float, float]:
    """Seconds per token of a batch-1 step's Linear products alone, in the model's order and with its own weights:
    fp32 ``F.linear``, and the w8a8 model's int8 × int8 ``torch._int_mm`` — the floor under any fp32 engine, and the
    same work at a quarter of the bytes."""
    from distgpt.model.quant import W8A8Linear

    fp = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    q = [m.qweight for m in qmodel.modules() if isinstance(m, W8A8Linear)]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in fp}
    xq = {k: torch.randint(-127, 128, (1, k), dtype=torch.int8) for k in xs}

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        return (time.perf_counter() - start) / rounds

    with torch.no_grad():
        return (timed(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in fp]),
                timed(lambda: [torch._int_mm(xq[w.shape[1]], w.t()) for w in q]))


def engines(args) -> dict:
    """Part 1: the table of engines at batch 1 (returns the measurements)."""
    from distgpt.infer.artifact import PROBE_PROMPTS, agreement
    from distgpt.infer.runner import EngineSpec, Runner
    from distgpt.model.quant import quantize_int8, quantize_w8a8

    model, tok = _model(args)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    prompt = tok.encode(PROMPT)[: model.cfg.block_size // 4]
    n = min(args.tokens, model.cfg.block_size - len(prompt))
    runners = {"static": Runner(model, EngineSpec("eager", 1)), "compiled": Runner(model, EngineSpec("compiled", 1)),
               "int8": Runner(quantize_int8(copy.deepcopy(model)), EngineSpec("compiled", 1, quantize="int8")),
               "w8a8": Runner(quantize_w8a8(copy.deepcopy(model)), EngineSpec("compiled", 1, quantize="w8a8"))}
    compile_s = {}
    for name in ("compiled", "int8", "w8a8"):
        start = time.perf_counter()
        runners[name].warmup([1], [len(prompt)])
        compile_s[name] = time.perf_counter() - start
    print(f"model: {params:.1f}M parameters ({'checkpoint' if args.checkpoint else 'random weights'}), prompt "
          f"{len(prompt)} tokens, {n} greedy tokens, {args.rounds} interleaved rounds, {torch.get_num_threads()} "
          f"threads", flush=True)
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in ("eager", *runners)}
    for _ in range(args.rounds):
        rows["eager"].append(_eager(model, prompt, n))
        for name, runner in runners.items():
            rows[name].append(_runner_speed(runner, prompt, n))
    agree = {k: agreement(runners[k], runners["compiled"], tok) for k in ("int8", "w8a8")}
    print(f"{'engine':10} {'tokens/s':>9} {'spread':>15} {'TTFT ms':>8} {'× eager':>8} {'compile s':>10}")
    for name, rs in rows.items():
        speeds = [r[1] for r in rs]
        ratio = statistics.median(s / e[1] for s, e in zip(speeds, rows["eager"], strict=True))
        print(f"{name:10} {statistics.median(speeds):9.1f} {min(speeds):7.1f}–{max(speeds):<7.1f} "
              f"{1e3 * statistics.median(r[0] for r in rs):8.1f} {ratio:8.2f} "
              f"{compile_s.get(name, 0):10.1f}")
    lin, lin_q = _linears_alone(model, runners["w8a8"].decoder.model)
    eager_s = 1 / statistics.median(r[1] for r in rows["eager"])
    print(f"the Linear products of one token alone: fp32 {1e3 * lin:.2f} ms ({100 * lin / eager_s:.0f}% of an eager "
          f"step, so fp32 engines are ≤ {eager_s / lin:.2f}× eager), int8 × int8 {1e3 * lin_q:.2f} ms")
    for k in ("int8", "w8a8"):
        ratio = statistics.median(q[1] / c[1] for q, c in zip(rows[k], rows["compiled"], strict=True))
        print(f"{k} vs compiled fp32: {ratio:.2f}× tokens/s (median of the rounds' ratios); greedy agreement with "
              f"fp32 {100 * agree[k]:.1f}% (teacher-forced, {len(PROBE_PROMPTS)} prompts)")
    return {"rows": rows, "agreement": agree, "compile_s": compile_s}


def _client(port: int, body: dict, stream: bool, results: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    conn.request("POST", "/v1/completions", json.dumps({**body, **extra}))
    resp = conn.getresponse()
    first = None
    tokens = 0
    if stream:
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    else:
        tokens = json.loads(resp.read())["usage"]["completion_tokens"]
        first = time.perf_counter()
    results.append(((first or time.perf_counter()) - start, tokens, time.perf_counter()))


def _load(port: int, concurrency: int, per_client: int, tokens: int, stream: bool) -> tuple[float, float, float]:
    """(total tokens/s, TTFT p50, TTFT p99) with ``concurrency`` clients each sending ``per_client`` requests."""
    results: list = []
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0.8, "seed": 0}

    def worker() -> None:
        for _ in range(per_client):
            _client(port, body, stream, results)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
    return sum(r[1] for r in results) / elapsed, statistics.median(ttft), p99


def _start(model_dir: str, args, replicas: int) -> tuple[subprocess.Popen, int]:
    """A ``distgpt serve`` process (``replicas`` > 0: on Ray Serve, an embedded cluster, that many replicas sharing
    this machine's cores) and the port it listens on."""
    slots = str(max(args.levels))
    cmd = [sys.executable, "-m", "distgpt", "serve", model_dir, "--max-batch", slots, "--engine", args.server_engine,
           "--max-concurrent", str(4 * max(args.levels))]
    if replicas:
        with socket.socket() as s:  # Serve's proxy needs a port named in advance
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["--ray", "--replicas", str(replicas), "--port", str(port)]
    else:
        cmd += ["--port", "0"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, int(line.split("http://127.0.0.1:")[1].split()[0])


def server(args) -> None:
    """Part 2: a real server process under 1, 8 and 32 concurrent clients (and the same on Ray Serve)."""
    from distgpt.checkpoint.export import save_model_dir

    model, tok = _model(args)
    print(f"server ({args.server_engine}, {max(args.levels)} slots): {args.server_tokens} tokens per request")
    print(f"{'transport':>12} {'clients':>7} {'stream':>6} {'tokens/s':>9} {'× 1 client':>10} {'TTFT p50 ms':>12} "
          f"{'p99 ms':>8} {'p99/p50':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(tmp, model, model.cfg, tok)
        for replicas in [0, *args.ray_replicas]:
            proc, port = _start(tmp, args, replicas)
            name = f"ray × {replicas}" if replicas else "one process"
            try:
                base: dict[bool, float] = {}
                for stream in (True, False) if not replicas else (True,):
                    for c in args.levels:
                        tps, p50, p99 = _load(port, c, max(2, 64 // c) if c < 8 else 2, args.server_tokens, stream)
                        base.setdefault(stream, tps)
                        print(f"{name:>12} {c:7d} {str(stream):>6} {tps:9.1f} {tps / base[stream]:10.2f} "
                              f"{1e3 * p50:12.1f} {1e3 * p99:8.1f} {p99 / p50:7.2f}", flush=True)
            finally:
                proc.send_signal(signal.SIGINT)  # Ray Serve removes its app and stops its embedded cluster
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()


def run(args) -> int:
    """Both parts (``--part`` picks one)."""
    if args.part in ("all", "engines"):
        engines(args)
    if args.part in ("all", "server"):
        server(args)
    return 0
