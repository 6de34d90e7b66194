"""Supervised fine-tuning: conversations → masked, packed rows; packed = unpacked; [init] from a trained model."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distgpt.config_schema import ConfigError
from distgpt.data.chat import PAD, PROMPT, REPLY, render, to_rows
from distgpt.data.loader import TokenDataset, load_tokenizer
from distgpt.data.prepare import PrepareSpec, prepare
from distgpt.data.tokenizer import ASSISTANT, CHAT_TOKENS, END, USER, ByteTokenizer
from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT
from distgpt.train.objectives.sft import SupervisedChat
from distgpt.train.trainer import Trainer

from ..conftest import tiny_job

CONVS = [[("user", "hi"), ("assistant", "hello!")],
         [("system", "be brief"), ("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"), ("assistant", "6")],
         [("user", "name?"), ("assistant", "gpt")]]
TOK = ByteTokenizer().with_specials(CHAT_TOKENS)


def test_template_marks_the_assistants_tokens_and_keeps_every_old_id():
    ids, roles = render(TOK, CONVS[0])
    assert ids[0] == TOK.special_id(USER) and ids[3] == TOK.special_id(END) and ids[4] == TOK.special_id(ASSISTANT)
    assert ids[1:3] == list(b"hi") and ids[-1] == TOK.eot_id == 256  # byte ids and EOT unchanged by the markers
    assert roles[:5] == [PROMPT] * 5  # user turn and the assistant marker are prompt
    reply = [i for i, r in zip(ids, roles, strict=True) if r == REPLY]
    assert reply == [*b"hello!", TOK.special_id(END)]  # the reply and its end marker: the model learns to stop


def test_prepare_reads_messages_prompt_response_parquet_and_chatterbot(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}) + "\n"
                                      + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    pq.write_table(pa.table({"prompt": ["q1", "q2"], "response": ["a1", "a2"]}), tmp_path / "b.parquet")
    spec = PrepareSpec((str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"), "builtin:chatterbot/chinese"),
                       str(tmp_path / "out"), "byte", 0, 64, 0.1, format="chat", packing=True)
    manifest = prepare(spec, progress=lambda s: None)
    assert manifest["columns"] == ["tokens", "roles", "segments"] and manifest["chat"]["packing"]
    ds = TokenDataset(str(tmp_path / "out"))
    cols = ds.take_columns(list(range(len(ds))))
    assert set(cols) == {"tokens", "roles", "segments"} and int(cols["segments"].max()) >= 2  # packed rows
    assert load_tokenizer(str(tmp_path / "out")).special_id(ASSISTANT) is not None
    assert manifest["splits"]["train"]["conversations"] + manifest["splits"]["val"]["conversations"] > 50


def test_bad_conversation_lines_name_the_file_and_line(tmp_path):
    from distgpt.data.sources import SourceError

    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    spec = PrepareSpec((str(tmp_path / "bad.jsonl"),), str(tmp_path / "o"), "byte", 0, 32, 0.0, format="chat")
    with pytest.raises(SourceError, match="bad.jsonl:1: each message needs role system|user|assistant"):
        prepare(spec, progress=lambda s: None)
    assert not (tmp_path / "o" / "manifest.json").exists()


def _batch(rows, packed: bool):
    obj = SupervisedChat()
    obj.packed = packed
    cols = {"tokens": torch.from_numpy(rows.tokens), "roles": torch.from_numpy(rows.roles.astype("int64")),
            "segments": torch.from_numpy(rows.segments.astype("int64"))}
    return obj, obj.make_batch(cols)


def _loss_and_grads(model, obj, batch):
    model.zero_grad()
    out = model(batch.inputs, **obj.model_inputs(batch))
    loss = obj.loss(out, batch) / obj.normaliser(batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pos", ["learned", "rotary", "sinusoidal"])
def test_packed_rows_compute_exactly_what_unpacked_rows_do(pos):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32,
                          pos_encoding=pos))
    rendered = [render(TOK, c) for c in CONVS]
    packed, padded = to_rows(rendered, 97, TOK.eot_id, True), to_rows(rendered, 97, TOK.eot_id, False)
    assert len(packed.tokens) == 1 and len(padded.tokens) == 3
    lp, gp = _loss_and_grads(model, *_batch(packed, True))
    lu, gu = _loss_and_grads(model, *_batch(padded, False))
    assert lp == pytest.approx(lu, rel=1e-5)
    for name in gp:
        torch.testing.assert_close(gp[name], gu[name], rtol=1e-5, atol=1e-6)


def test_no_attention_crosses_a_conversation_boundary():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32,
                          pos_encoding="rotary")).eval()
    rows = to_rows([render(TOK, c) for c in CONVS], 97, TOK.eot_id, True)
    obj, batch = _batch(rows, True)
    seg = batch.extras["segments"][0]
    first = seg == 1
    changed = batch.inputs.clone()
    changed[0, first] = (changed[0, first] + 7) % 256  # rewrite the first conversation entirely
    with torch.no_grad():
        a = model(batch.inputs, segments=batch.extras["segments"])
        b = model(changed, segments=batch.extras["segments"])
    assert not torch.allclose(a[0, first], b[0, first])
    torch.testing.assert_close(a[0, ~first], b[0, ~first], rtol=0, atol=0)  # the others do not see it


def test_a_prompt_target_never_changes_the_sft_loss_an_assistant_target_does():
    rows = to_rows([render(TOK, CONVS[0])], 33, TOK.eot_id, False)
    obj, batch = _batch(rows, False)
    logits = torch.randn(1, 32, TOK.vocab_size)
    base = float(obj.loss(logits, batch))
    roles = torch.from_numpy(rows.roles.astype("int64"))[:, 1:]
    for code, same in ((PROMPT, True), (REPLY, False)):
        t = int((roles[0] == code).nonzero()[0])
        changed = batch.targets.clone()
        changed[0, t] = (changed[0, t] + 1) % 256
        got = float(obj.loss(logits, type(batch)(batch.inputs, changed, batch.loss_mask)))
        assert (got == pytest.approx(base)) is same
    assert float(obj.normaliser(batch)) == int((roles == REPLY).sum()) and PAD == 0


def test_sft_from_a_trained_model_in_one_process(tiny_data, tmp_path):
    pre = Trainer(tiny_job(tiny_data, str(tmp_path / "pre"), "--train.max_steps=3"), log=lambda s: None).fit()
    over = ("--objective.kind=sft", "--data.format=chat", "--data.sources=['builtin:chatterbot/english']",
            "--data.packing=true", f"--data.prepared={tmp_path / 'chat'}", "--train.max_steps=4")
    from distgpt.data.prepare import ensure_prepared

    job = tiny_job(tiny_data, str(tmp_path / "sft"), *over, f"--init.from={pre.final_dir}")
    ensure_prepared(job, progress=lambda s: None)
    lines: list[str] = []
    t = Trainer(job, log=lines.append)
    assert any("initialised from" in ln and "4 new vocabulary rows" in ln for ln in lines)
    from distgpt.checkpoint.export import load_model_dir

    old = load_model_dir(pre.final_dir)[0]
    emb = t.engine.modules[0].tok_emb.weight.detach()
    torch.testing.assert_close(emb[:257], old.tok_emb.weight)  # old rows unchanged
    torch.testing.assert_close(emb[257:], old.tok_emb.weight.mean(0).expand(4, -1))
    res = t.fit()
    assert len(res.losses) == 4 and res.val_losses
    bad = tiny_job(tiny_data, str(tmp_path / "bad"), *over, f"--init.from={pre.final_dir}", "--model.n_embd=64",
                   "--model.n_head=2")
    with pytest.raises(ConfigError, match="n_embd 32.*the job builds .*n_embd 64"):
        Trainer(bad, log=lambda s: None)


def test_chatterbot_dialogues_also_read_as_plain_text(tmp_path):
    """For continued pre-training on a machine without other text: each dialogue is one document."""
    from distgpt.data.sources import expand_sources, read_documents

    docs = [d for f in expand_sources(["builtin:chatterbot/chinese"]) for d in read_documents(f, "text")]
    assert len(docs) > 400 and all("conversations:" not in d and "- - " not in d for d in docs)
    assert "人工智能" in "".join(docs)
