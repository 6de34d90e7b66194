"""English → Chinese: after ``tokenizer extend``, a short continued pre-training reaches a lower Chinese loss per
character than the same budget without extension, and replaying English (``data.mix``) forgets less English.
Real text: ``../shared/data`` (tinyshakespeare, Tang poems); skipped where it is absent."""

from __future__ import annotations

import pytest
import torch

from distgpt.checkpoint.export import load_model_dir
from distgpt.cli import main
from distgpt.config import load_job
from distgpt.data.loader import TokenDataset, load_tokenizer
from distgpt.data.prepare import ensure_prepared
from distgpt.train.objectives.lm import lm_loss
from distgpt.train.trainer import Trainer

from ..conftest import REPO, SHAKESPEARE

POEMS = REPO.parent / "shared" / "data" / "tang-poems.txt"
COMMON = ["--model.n_layer=2", "--model.n_head=4", "--model.n_embd=64", "--model.block_size=64",
          "--model.pos_encoding=rotary", "--data.seq_len=64", "--data.tokenizer=bpe", "--data.max_bytes=0",
          "--train.global_batch_size=16", "--plan.micro_batch_size=0", "--train.eval_batches=4",
          "--train.progress=false", "--train.tensorboard=false", "--train.warmup_steps=10"]


def _train(tmp_path, name: str, *over: str):
    job = load_job(REPO / "jobs" / "tiny.toml", [*COMMON, f"--data.prepared={tmp_path / name}",
                                                  f"--run.out_dir={tmp_path / name}-run", *over])
    ensure_prepared(job, progress=lambda s: None)
    return Trainer(job, log=lambda s: None).fit()


def _tokens_per_char(prepared) -> float:
    toks = TokenDataset(str(prepared), "val").samples[:, 1:].reshape(-1)
    return len(toks) / len(load_tokenizer(str(prepared)).decode(toks.tolist()))


@torch.no_grad()
def _loss_on(model_dir: str, prepared) -> float:
    model = load_model_dir(model_dir)[0]
    rows = TokenDataset(str(prepared), "val").take(list(range(64)))
    return float(lm_loss(model(rows[:, :-1]), rows[:, 1:]))


@pytest.mark.slow
@pytest.mark.skipif(not (SHAKESPEARE.exists() and POEMS.exists()), reason="needs ../shared/data")
def test_extension_helps_the_new_language_and_replay_keeps_the_old(tmp_path):
    en = _train(tmp_path, "en", f"--data.sources=['{SHAKESPEARE}']", "--data.vocab_size=512", "--train.max_steps=150",
                "--train.lr=3e-3", "--train.eval_interval=150")
    assert main(["tokenizer", "extend", "--from", en.final_dir, "--corpus", str(POEMS), "--add", "500", "--out",
                 str(tmp_path / "en-zh")]) == 0
    zh = [f"--data.sources=['{POEMS}']", "--train.max_steps=60", "--train.lr=1e-3", "--train.eval_interval=60"]
    plain = _train(tmp_path, "zh-plain", *zh, f"--init.from={en.final_dir}")
    ext = _train(tmp_path, "zh-ext", *zh, f"--init.from={tmp_path / 'en-zh'}")
    replay = _train(tmp_path, "zh-replay", *zh, f"--init.from={tmp_path / 'en-zh'}",
                    f"--data.mix={{'{tmp_path / 'en'}' = 0.25}}")
    tpc_plain, tpc_ext = _tokens_per_char(tmp_path / "zh-plain"), _tokens_per_char(tmp_path / "zh-ext")
    assert tpc_ext < 0.7 * tpc_plain, (tpc_plain, tpc_ext)  # ≥ 30% fewer tokens per Chinese character
    assert ext.val_losses[60] * tpc_ext < plain.val_losses[60] * tpc_plain  # lower loss per character, same budget
    forgot_without, forgot_with = _loss_on(ext.final_dir, tmp_path / "en"), _loss_on(replay.final_dir, tmp_path / "en")
    assert forgot_with < forgot_without, (forgot_with, forgot_without)  # replay keeps more English
    assert replay.mix_val_losses[str(tmp_path / "en")][60] == pytest.approx(forgot_with, rel=0.2)
