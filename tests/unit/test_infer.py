"""The inference form: static-cache decoder, compiled runner, iteration-level batcher, artifacts (eager and int8)."""

from __future__ import annotations

import shutil

import pytest
import torch

from distgpt.checkpoint.export import save_model_dir
from distgpt.data.tokenizer import CHAT_TOKENS, ByteTokenizer
from distgpt.infer.artifact import agreement, export_artifact, greedy_tokens, load_runner, spec_of
from distgpt.infer.batcher import Batcher, Busy, Stream
from distgpt.infer.runner import EngineSpec, Runner, graphs_compiled
from distgpt.model.config import GPTConfig
from distgpt.model.generate import SamplingConfig, generate_ids
from distgpt.model.gpt import GPT

TOK = ByteTokenizer().with_specials(CHAT_TOKENS)
GREEDY = SamplingConfig(max_new_tokens=24, temperature=0.0)
needs_cxx = pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler")


def small_model(pos: str = "rotary", block: int = 320, seed: int = 4) -> GPT:
    """A model whose greedy continuations are not degenerate (weights larger than the GPT-2 init) and are printable
    text: the (tied) embedding rows of every token but printable ASCII are zero, so their logit is 0 while some
    printable token's is positive. Seed 4: a continuation of several tokens under every position encoding."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=block, n_layer=2, n_head=2, n_embd=32,
                          pos_encoding=pos))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        printable = torch.zeros(TOK.vocab_size, dtype=torch.bool)
        printable[32:127] = True
        model.tok_emb.weight[~printable] = 0.0
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("model"))
    model = small_model()
    save_model_dir(out, model, model.cfg, TOK)
    return out


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary"])
def test_static_cache_decoder_gives_the_eager_greedy_tokens(pos):
    model = small_model(pos, block=64)
    prompt = TOK.encode("def main():")
    want = list(generate_ids(model, prompt, GREEDY))
    assert len(set(want)) > 3, "the reference continuation should not be one repeated token"
    assert greedy_tokens(Runner(model, EngineSpec("eager", max_batch=4)), prompt, len(want)) == want


def test_batched_requests_equal_each_alone_and_share_steps():
    model = small_model(block=64)
    prompts = [TOK.encode(p) for p in ("a = 1", "import os\n", "class Foo:", "x")]
    alone = [list(generate_ids(model, p, GREEDY)) for p in prompts]
    batcher = Batcher(Runner(model, EngineSpec("eager", max_batch=4)))
    try:
        streams = [batcher.submit(Stream(p, GREEDY)) for p in prompts]
        together = [list(s) for s in streams]
    finally:
        batcher.close()
    assert together == alone
    assert all(s.finished.reason == "length" for s in streams)
    # 4 requests × 23 decode steps each, run as shared steps: far fewer than 92 (joins may land a step apart).
    assert batcher.steps < 2 * GREEDY.max_new_tokens


def test_a_request_joins_a_running_batch_and_leaves_when_done():
    model = small_model(block=64)
    long_cfg = SamplingConfig(max_new_tokens=40, temperature=0.0)
    batcher = Batcher(Runner(model, EngineSpec("eager", max_batch=2)))
    try:
        first = batcher.submit(Stream(TOK.encode("hello"), long_cfg))
        it = iter(first)
        head = [next(it) for _ in range(10)]  # the first request is mid-generation …
        second = batcher.submit(Stream(TOK.encode("x = "), GREEDY))  # … when the second joins
        joined = list(second)
        rest = head + list(it)
    finally:
        batcher.close()
    assert joined == list(generate_ids(model, TOK.encode("x = "), GREEDY))
    assert rest == list(generate_ids(model, TOK.encode("hello"), long_cfg))
    assert batcher.steps < 40 + 24 - 2, "the second request should have shared the first one's steps"


def test_cancel_frees_the_slot_and_the_concurrency_limit():
    model = small_model(block=320)
    batcher = Batcher(Runner(model, EngineSpec("eager", max_batch=1)), max_open=1)
    try:
        long = batcher.submit(Stream(TOK.encode("a"), SamplingConfig(max_new_tokens=300, temperature=0.0)))
        next(iter(long))
        with pytest.raises(Busy, match="max_concurrent_requests"):
            batcher.submit(Stream(TOK.encode("b"), GREEDY))
        long.cancel()
        assert batcher.open_requests == 0
        short = batcher.submit(Stream(TOK.encode("b"), GREEDY))  # the one slot is reused at the next step
        assert len(list(short)) == GREEDY.max_new_tokens
    finally:
        batcher.close()
    assert long.finished.reason == "cancelled" and long.generated < 300


def test_stop_token_and_context_end_a_request():
    model = small_model(block=32)
    prompt = TOK.encode("abc")
    want = list(generate_ids(model, prompt, GREEDY))
    batcher = Batcher(Runner(model, EngineSpec("eager", max_batch=2)))
    try:
        stopped = batcher.submit(Stream(prompt, GREEDY, frozenset({want[5]})))
        assert list(stopped) == want[: want.index(want[5])] and stopped.finished.reason == "stop"
        full = batcher.submit(Stream(prompt, SamplingConfig(max_new_tokens=100, temperature=0.0)))
        assert len(list(full)) == 32 - len(prompt) + 1 and full.finished.reason == "length"
        with pytest.raises(ValueError, match="at most 31"):
            batcher.submit(Stream(list(range(40)), GREEDY))
    finally:
        batcher.close()


@needs_cxx
def test_compiled_equals_eager_with_zero_recompiles_over_256_tokens(model_dir):
    runner, tok, _ = load_runner(model_dir, "compiled", 1)
    prompt = tok.encode("def f(x):")
    eager = list(generate_ids(small_model(), prompt, SamplingConfig(max_new_tokens=256, temperature=0.0)))
    before = graphs_compiled()
    runner.warmup([1], [len(prompt)])
    assert graphs_compiled() - before >= 2, "warm-up should have compiled prefill and decode (the counter works)"
    before = graphs_compiled()
    compiled = greedy_tokens(runner, prompt, 256)
    longer = tok.encode("class Parser:\n    def parse(self, text):\n")  # another padded length: same graph
    greedy_tokens(runner, longer, 8)
    assert graphs_compiled() - before == 0, "a token of the 256, or a longer prompt, recompiled"
    assert compiled == eager


def test_fp32_artifact_reloads_to_the_same_tokens(model_dir, tmp_path):
    report = export_artifact(model_dir, str(tmp_path / "art"), EngineSpec("eager", max_batch=2))
    runner, tok, meta = load_runner(str(tmp_path / "art"))
    assert spec_of(meta) == EngineSpec("eager", max_batch=2) and report.agreement is None
    prompt = tok.encode("for i in")
    assert greedy_tokens(runner, prompt, 24) == list(generate_ids(small_model(), prompt, GREEDY))


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_int8_artifact_is_smaller_reloads_exactly_and_reports_agreement(model_dir, tmp_path, mode):
    fp = export_artifact(model_dir, str(tmp_path / "fp"), EngineSpec("eager"))
    q = export_artifact(model_dir, str(tmp_path / "q"), EngineSpec("eager", quantize=mode))
    assert q.bytes < 0.6 * fp.bytes
    assert 0.5 < q.agreement <= 1.0
    runner, _, meta = load_runner(str(tmp_path / "q"), max_batch=1)
    assert meta["inference"]["quantize"] == mode
    from torchao.quantization import Int8Tensor

    from distgpt.model.quant import W8A8Linear

    fc1 = runner.decoder.model.layers["0"].mlp.fc1
    assert isinstance(fc1, W8A8Linear) if mode == "w8a8" else isinstance(fc1.weight, Int8Tensor)
    fp_runner, _, _ = load_runner(str(tmp_path / "fp"), max_batch=1)
    assert agreement(runner, fp_runner, TOK) == pytest.approx(q.agreement)  # reload = the exported numbers


def test_a_damaged_inference_spec_is_one_clear_error(model_dir, tmp_path):
    import json

    from distgpt.checkpoint.export import ModelDirError

    shutil.copytree(model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["inference"] = {"engine": "warp", "slots": 3}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="unknown inference keys"):
        load_runner(str(tmp_path / "m"))


def test_w8a8_linear_is_int8_arithmetic_close_to_the_float_layer():
    from distgpt.model.quant import W8A8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 24)
    q = W8A8Linear.from_linear(lin)
    x = torch.randn(2, 3, 48)
    y = q(x)
    # the same arithmetic by hand in float64: each row and each weight row rounded to 127 steps of its absmax
    rows = x.reshape(-1, 48).double()
    xs = rows.abs().amax(1, keepdim=True) / 127
    w = lin.weight.detach().double()
    ws = w.abs().amax(1, keepdim=True) / 127
    ref = (torch.round(rows / xs) * xs) @ (torch.round(w / ws) * ws).T + lin.bias.detach().double()
    assert torch.allclose(y.reshape(-1, 24).double(), ref, rtol=1e-5, atol=1e-5)
    exact = lin(x)
    assert (y - exact).abs().max() < 0.03 * exact.abs().max()  # int8 rounding, not a different function
    assert q.qweight.dtype == torch.int8 and y.shape == (2, 3, 24)


@needs_cxx
def test_compiled_w8a8_gives_the_eager_w8a8_tokens(model_dir, tmp_path):
    export_artifact(model_dir, str(tmp_path / "q"), EngineSpec("eager", quantize="w8a8"))
    eager, tok, _ = load_runner(str(tmp_path / "q"), "eager", 1)
    compiled, _, _ = load_runner(str(tmp_path / "q"), "compiled", 1)
    prompt = tok.encode("def f(x):")
    assert greedy_tokens(compiled, prompt, 48) == greedy_tokens(eager, prompt, 48)
