"""Job files: TOML and YAML, overrides, and one clear error per problem with exit code 2 and nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distgpt.cli import main
from distgpt.config import load_job, parse_overrides
from distgpt.config_schema import ConfigError

from ..conftest import REPO


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "jobs").glob("*.toml")))
def test_shipped_jobs_load(name):
    job = load_job(REPO / "jobs" / name)
    assert job.train.max_steps > 0 and job.data.sources


def test_yaml_equals_toml(tmp_path):
    (tmp_path / "j.yaml").write_text("run: {name: y}\ntrain: {lr: 0.001, max_steps: 7}\nmodel: {preset: tiny}\n")
    (tmp_path / "j.toml").write_text("[run]\nname='y'\n[train]\nlr=0.001\nmax_steps=7\n[model]\npreset='tiny'\n")
    assert load_job(tmp_path / "j.yaml") == load_job(tmp_path / "j.toml")


def test_overrides_are_typed_and_nested():
    o = parse_overrides(["--train.lr=3e-4", "--train.tensorboard=false", "--data.sources=['a', 'b']",
                         "--run.name=hello world"])
    assert o == {"train": {"lr": 3e-4, "tensorboard": False}, "data": {"sources": ["a", "b"]},
                 "run": {"name": "hello world"}}
    job = load_job(REPO / "jobs" / "tiny.toml", ["--train.max_steps=3", "--model.pos_encoding=rotary"])
    assert job.train.max_steps == 3 and job.gpt_config(257).pos_encoding == "rotary"


def test_every_problem_is_reported_with_key_and_fix(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_job(REPO / "jobs" / "tiny.toml",
                 ["--train.lrr=1", "--train.max_steps=ten", "--data.seq_len=4096", "--model.n_head=5",
                  "--train.micro_batch_size=3", "--bogus.x=1"])
    msg = str(err.value)
    assert "train.lrr: unknown key — did you mean train.lr?" in msg
    assert "train.max_steps: expected int, got 'ten'" in msg
    assert "data.seq_len: 4096 exceeds model.block_size 64" in msg
    assert "model.n_head" in msg and "not divisible" in msg
    assert "train.micro_batch_size: 3 must divide" in msg
    assert "bogus: unknown section" in msg
    assert len(err.value.problems) == 6


def test_types_are_strict():
    with pytest.raises(ConfigError, match="train.tensorboard: expected bool"):
        load_job(None, ["--train.tensorboard=1"])
    with pytest.raises(ConfigError, match="data.tokenizer: expected 'bpe' | 'byte'"):
        load_job(None, ["--data.tokenizer=wordpiece"])
    assert load_job(None, ["--train.lr=1"]).train.lr == 1.0  # an int is a fine float


def test_cli_bad_job_exits_2_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(f"[run]\nout_dir = '{tmp_path}/out'\n[train]\nlr = -1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.lr / train.min_lr" in err and err.startswith("distgpt: error:")
    assert not (tmp_path / "out").exists()
    (tmp_path / "broken.toml").write_text("[train\nlr=")
    assert main(["train", str(tmp_path / "broken.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.toml")]) == 2


def test_console_script_reports_config_errors():
    proc = subprocess.run([sys.executable, "-m", "distgpt.cli", "config", "jobs/tiny.toml", "--train.max_steps=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "train.max_steps: must be ≥ 1" in proc.stderr
