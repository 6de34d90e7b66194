"""``init.from`` weight sources, one process: a model directory read one tensor at a time — local or in object
storage (streamed to a temporary file, removed again) — with vocabulary growth, and the errors a user can fix."""

from __future__ import annotations

import glob
import tempfile
from dataclasses import replace

import pytest
import torch

from distgpt.checkpoint.export import save_model_dir
from distgpt.config_schema import ConfigError
from distgpt.data.tokenizer import ByteTokenizer
from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT
from distgpt.train.init import grow_rows, open_initial

from ..conftest import moto_s3

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=258, block_size=8)


def _saved(where: str) -> GPT:
    torch.manual_seed(3)
    model = GPT(CFG)
    save_model_dir(where, model, CFG, ByteTokenizer())
    return model


def test_a_model_directory_in_object_storage_is_read_one_tensor_at_a_time_and_leaves_no_file():
    before = set(glob.glob(f"{tempfile.gettempdir()}/distgpt-init-*"))
    with moto_s3("models") as (port, _):
        uri = f"s3://models/m?endpoint_override=127.0.0.1:{port}&scheme=http"
        trained = _saved(uri)
        bigger = replace(CFG, vocab_size=260)
        weights, line = open_initial(uri, bigger)
        assert "2 new vocabulary rows" in line and "endpoint_override" not in line
        emb = weights.tensor("tok_emb.weight", (260, 16))
        assert torch.equal(emb, grow_rows(trained.tok_emb.weight.detach(), 260))
        assert torch.equal(weights.tensor("lm_head.weight", (260, 16)), emb)  # tied: the head is the embedding
        assert torch.equal(weights.tensor("layers.1.mlp.fc1.weight", (64, 16)), trained.layers["1"].mlp.fc1.weight)
    assert set(glob.glob(f"{tempfile.gettempdir()}/distgpt-init-*")) == before


def test_wrong_shapes_and_missing_tensors_are_config_errors(tmp_path):
    _saved(str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="differs in n_layer"):
        open_initial(str(tmp_path / "m"), replace(CFG, n_layer=3))
    weights, _ = open_initial(str(tmp_path / "m"), CFG)
    with pytest.raises(ConfigError, match="holds no 'layers.9.attn.qkv.weight'"):
        weights.tensor("layers.9.attn.qkv.weight", (48, 16))
    with pytest.raises(ConfigError, match="neither a model directory"):
        open_initial(str(tmp_path / "nothing"), CFG)


@pytest.mark.parametrize("tied", [True, False])
def test_a_checkpoint_root_whose_vocabulary_grows_loads_the_grown_weights(tmp_path, tied):
    from distgpt.checkpoint.manager import CheckpointManager
    from distgpt.parallel import OptimSettings, parallelize
    from distgpt.parallel.mesh import build_mesh
    from distgpt.planner.plan import Plan
    from distgpt.train.init import CheckpointWeights, load_initial_weights
    from distgpt.train.objectives import resolve

    small = replace(CFG, tie_embeddings=tied)
    torch.manual_seed(5)
    trained = GPT(small)
    engine = parallelize(trained, build_mesh(Plan()), OptimSettings(1e-3, 0.0, (0.9, 0.95), 1.0, 8, 16), resolve("lm"))
    CheckpointManager(str(tmp_path / "ck")).save(1, engine, {"model": small.to_dict()})
    big = replace(small, vocab_size=small.vocab_size + 3)
    weights, line = open_initial(str(tmp_path / "ck"), big)
    assert isinstance(weights, CheckpointWeights) and "3 new vocabulary rows" in line  # read by DCP, not consolidated
    model = GPT(big)
    load_initial_weights(model, str(tmp_path / "ck"))
    want = {k: v for k, v in trained.state_dict().items()}
    for key in ("tok_emb.weight", *(() if tied else ("lm_head.weight",))):
        want[key] = grow_rows(want[key], big.vocab_size)
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not (tied and k == "lm_head.weight"))
    assert torch.equal(got["lm_head.weight"], got["tok_emb.weight"]) == tied
