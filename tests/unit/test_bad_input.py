"""Malformed input through the real command line (``distgpt.cli.main``): each case exits 2 (3: a plan nothing can
run), prints one message naming the problem, no traceback, and writes nothing. The README's "When things go wrong"
table lists these cases."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from distgpt.cli import main

from ..conftest import REPO

TINY = str(REPO / "jobs" / "tiny.toml")
LOCAL = ["--cluster.launcher=local", "--train.progress=false"]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _write(tmp: Path, name: str, text: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


# (case, files to write {name: content}, argv with {tmp}, exit code, message pattern)
CASES = [
    ("plan file missing", {}, ["train", TINY, "--plan", "{tmp}/nope.json"], 2,
     r"--plan .*nope.json:\n.*cannot read it"),
    ("plan not JSON", {"p.json": "{bad"}, ["train", TINY, "--plan", "{tmp}/p.json"], 2, r"cannot read it \(Expect"),
    ("plan unknown key", {"p.json": '{"dp": 1, "bogus": 3}'}, ["train", TINY, "--plan", "{tmp}/p.json"], 2,
     r"plan\.bogus: unknown key"),
    ("plan wrong type", {"p.json": '{"dp": "two"}'}, ["train", TINY, "--plan", "{tmp}/p.json"], 2,
     r"plan\.dp: expected int, got 'two'"),
    ("plan not a table", {"p.json": "[1]"}, ["train", TINY, "--plan", "{tmp}/p.json"], 2, r"expected a table"),
    ("plan invalid", {"p.json": '{"dp": 0}'}, ["train", TINY, "--plan", "{tmp}/p.json"], 2, r"dp: must be ≥ 1"),
    ("plan world ≠ processes", {"p.json": '{"dp": 2, "micro_batch_size": 4}'},
     ["train", TINY, "--plan", "{tmp}/p.json", "--data.prepared={tmp}/data"], 2,
     r"needs dp×tp×pp = 2×1×1 = 2 processes, but 1 is running — run it under torchrun"),
    ("job plan world ≠ processes", {}, ["train", TINY, "--plan.dp=2", "--data.prepared={tmp}/data"], 2,
     r"the job's \[plan\]:\n.*2 processes"),
    ("compile with pipeline stages", {}, ["train", TINY, "--plan.pp=2", "--plan.compile=true"], 2,
     r"plan\.compile: with pipeline stages it is not supported yet — set plan\.compile=false"),
    ("inventory is a list", {"inv.yaml": "- a\n- b\n"}, ["plan", TINY, "--inventory", "{tmp}/inv.yaml"], 2,
     r"inv\.yaml: expected a table .* got a list"),
    ("inventory provider a string", {"inv.yaml": "provider: aws\n"}, ["plan", TINY, "--inventory", "{tmp}/inv.yaml"],
     2, r"inv\.yaml: provider: expected a table, got str"),
    ("inventory YAML malformed", {"inv.yaml": "nodes: [\n"}, ["plan", TINY, "--inventory", "{tmp}/inv.yaml"], 2,
     r"inv\.yaml: cannot be read as YAML"),
    ("inventory TOML malformed", {"inv.toml": "[[nodes]\nname=1\n"}, ["plan", TINY, "--inventory", "{tmp}/inv.toml"],
     2, r"inv\.toml: cannot be read as TOML"),
    ("inventory node type not a table", {"inv.yaml": "provider: {type: aws}\navailable_node_types: {gpu: [1]}\n"},
     ["plan", TINY, "--inventory", "{tmp}/inv.yaml"], 2, r"available_node_types\.gpu: expected a table"),
    ("nothing fits", {"inv.toml": '[[nodes]]\ndevice = "T4"\ncount = 1\n'},
     ["plan", TINY, "--inventory", "{tmp}/inv.toml", "--model.preset=13b"], 3,
     r"No plan fits 40-layer d=5120 on 1× T4"),
    ("binary corpus", {}, ["data", "prepare", TINY, "--data.sources=['/bin/ls']", "--out", "{tmp}/data"], 2,
     r"/bin/ls: not UTF-8 text \(\d+ invalid byte sequence\(s\) in \d+ bytes, NUL bytes\)"),
    ("unreadable corpus", {}, ["data", "prepare", TINY, "--data.sources=['/proc/self/mem']", "--out", "{tmp}/data"],
     2, r"/proc/self/mem: cannot be read"),
    ("impossible output", {}, ["data", "prepare", TINY, "--out", "/dev/null/x"], 2,
     r"data output /dev/null/x is not writable"),
    ("empty override key", {}, ["train", TINY, "--=1"], 2, r"--=1: no key before '='"),
    ("binary job file", {"job.toml": b"\xd0\xcf\x11\xe0\x00"}, ["train", "{tmp}/job.toml"], 2, r"job\.toml: not valid"),
    ("checkpoint manifest truncated", {"ck/step-00000003/manifest.json": '{"fil'},
     ["generate", "--checkpoint", "{tmp}/ck", "--prompt", "x"], 2, r"manifest\.json is corrupt"),
]


@pytest.mark.parametrize(("case", "files", "argv", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(tmp_path, capsys, case, files, argv, code, message):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _write(tmp_path, name, text)
    before = _files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*args, *(LOCAL if args[0] == "train" else [])]) == code
    err = capsys.readouterr()
    shown = err.err + err.out
    assert "Traceback" not in shown
    assert code == 3 or (len([ln for ln in err.err.splitlines() if ln.startswith("distgpt: error:")]) == 1)
    assert re.search(message, shown), shown
    assert _files(tmp_path) == before, f"{case}: wrote {_files(tmp_path) - before}"


def test_checkpoint_ls_shows_a_corrupt_manifest_and_ignores_stray_directories(tmp_path, capsys):
    (tmp_path / "step-abc").mkdir()
    (tmp_path / "step-00000003").mkdir()
    (tmp_path / "step-00000003" / "manifest.json").write_text('{"fil')
    assert main(["checkpoint", "ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "corrupt" in out and "step-abc" not in out and "abc" not in out


def test_a_stray_directory_in_the_checkpoint_root_does_not_stop_training(tiny_data, tmp_path, capsys):
    root = tmp_path / "ck"
    (root / "step-abc").mkdir(parents=True)
    (root / "notes").mkdir()
    args = ["train", TINY, f"--data.prepared={tiny_data}", f"--run.out_dir={tmp_path / 'out'}", *LOCAL,
            f"--checkpoint.uri={root}", "--checkpoint.interval=1", "--checkpoint.keep_last=1",
            "--train.max_steps=3", "--train.eval_interval=0", "--sample.max_new_tokens=1"]
    assert main(args) == 0  # retention ran after each of 3 commits
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-00000003", "step-abc"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_dataset_shard_is_one_clear_error(tiny_data, tmp_path, capsys, damage):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum sees it
    shard.write_bytes(bytes(raw))
    args = ["train", TINY, f"--data.prepared={data}", f"--run.out_dir={tmp_path / 'out'}", *LOCAL]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and shard.name in err
    assert ("truncated" if damage == "truncate" else "does not match its checksum") in err
    assert not (tmp_path / "out").exists()


def test_a_disk_that_fills_during_prepare_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    """The val shard's write fails (ENOSPC): exit 2 naming it, and no shard, tokenizer or manifest is left — also
    not the old dataset's manifest, which no longer matches once its shards are being replaced."""
    import errno

    from distgpt import storage

    out = tmp_path / "data"
    assert main(["data", "prepare", TINY, "--out", str(out), "--data.max_bytes=50_000"]) == 0
    real = storage.write_bytes

    def full(uri: str, data: bytes) -> None:
        if "val-" in uri:
            with storage._named("write", uri):  # where pyarrow's own write would raise it
                raise OSError(errno.ENOSPC, "No space left on device")
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", full)
    capsys.readouterr()
    assert main(["data", "prepare", TINY, "--out", str(out), "--data.max_bytes=60_000"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "val-00000.arrow" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == []
