"""The single-process trainer: determinism, gradient accumulation, schedule, logging, the saved model."""

from __future__ import annotations

import json

import pytest
import torch

from distgpt.checkpoint.export import load_model_dir
from distgpt.cli import main
from distgpt.model.gpt import GPT
from distgpt.parallel.optim import param_groups
from distgpt.train.schedule import lr_at
from distgpt.train.trainer import Trainer

from ..conftest import tiny_job


def run(tiny_data, out, *over):
    return Trainer(tiny_job(tiny_data, str(out), *over), log=lambda s: None).fit()


def test_same_seed_same_losses_bit_for_bit(tiny_data, tmp_path):
    over = ("--train.max_steps=6", "--model.dropout=0.1")  # dropout: the RNG must be seeded too
    a, b = run(tiny_data, tmp_path / "a", *over), run(tiny_data, tmp_path / "b", *over)
    assert a.losses == b.losses and len(a.losses) == 6
    c = run(tiny_data, tmp_path / "c", *over, "--run.seed=2")
    assert c.losses != a.losses


def test_gradient_accumulation_matches_one_big_batch(tiny_data, tmp_path):
    big = run(tiny_data, tmp_path / "a", "--train.max_steps=4", "--plan.micro_batch_size=8")
    acc = run(tiny_data, tmp_path / "b", "--train.max_steps=4", "--plan.micro_batch_size=2")
    assert acc.losses == pytest.approx(big.losses, rel=1e-5)


def test_loss_falls_and_everything_is_logged(tiny_data, tmp_path):
    res = run(tiny_data, tmp_path, "--train.tensorboard=true")
    assert res.losses[-1] < res.losses[0] - 0.5
    assert set(res.val_losses) == {10, 20}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") is None]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train)
    assert any((tmp_path / "tb").iterdir())


def test_final_model_reloads_exactly(tiny_data, tmp_path):
    trainer = Trainer(tiny_job(tiny_data, str(tmp_path), "--train.max_steps=3"), log=lambda s: None)
    res = trainer.fit()
    model, tok, meta = load_model_dir(res.final_dir)
    x = torch.randint(0, 257, (2, 16))
    torch.testing.assert_close(model(x), trainer.engine.modules[0].eval()(x), rtol=0, atol=0)
    assert meta["step"] == 3 and tok.vocab_size == 257


def test_generate_command_streams_from_saved_model(tiny_data, tmp_path, capsys):
    res = run(tiny_data, tmp_path, "--train.max_steps=2")
    capsys.readouterr()  # drop the trainer's own output
    assert main(["generate", "--checkpoint", res.final_dir, "--prompt", "import", "--max-new-tokens", "12",
                 "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("import") and len(out) > len("import\n"), "no token was generated"
    assert main(["generate", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", f"{res.final_dir}/model.safetensors"]) == 2  # a file, not a directory
    assert "not a model directory" in capsys.readouterr().err
    import shutil

    for name, damage in (("config.json", b'{"model": {"n_la'), ("tokenizer.json", b'{"kind": "bp')):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(res.final_dir, broken)
        (broken / name).write_bytes(damage)
        assert main(["generate", "--checkpoint", str(broken)]) == 2
        err = capsys.readouterr().err
        assert name in err and ("damaged" in err or "cannot be read" in err) and "Traceback" not in err


def test_schedule_and_no_decay_groups():
    assert lr_at(0, 1.0, 0.1, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 0.1, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)  # cosine midpoint
    assert lr_at(100, 1.0, 0.1, 10, 100) == pytest.approx(0.1)
    from distgpt.model.presets import preset

    model = GPT(preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    assert model.tok_emb.weight in no_decay["params"]  # embeddings (and the tied head) never decay
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_bf16_autocast_trains(tiny_data, tmp_path):
    """bf16 really computes in bf16 (every Linear's output is bfloat16 during training), keeps fp32 master weights,
    gives other losses than fp32 — and still learns."""
    t = Trainer(tiny_job(tiny_data, str(tmp_path / "bf16"), "--plan.dtype='bf16'", "--train.max_steps=10"),
                log=lambda s: None)
    seen: set[torch.dtype] = set()
    for m in t.engine.modules:
        for layer in m.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    res = t.fit()
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in t.engine.unique_params())
    fp32 = run(tiny_data, tmp_path / "fp32", "--train.max_steps=10")
    assert res.losses != fp32.losses
    assert res.losses[-1] < res.losses[0] - 0.3
