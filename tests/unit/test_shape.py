"""The shape the code keeps: commands that import no torch, a controller that imports no Ray, the Plan as the one
owner of micro-batch and precision (old [train] keys migrate with a warning), one error type caught once."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from distgpt.cli import main, registry
from distgpt.config import ConfigWarning, load_job
from distgpt.config_schema import ConfigError
from distgpt.errors import DistgptError

from ..conftest import REPO

NO_TORCH = """
import sys
from distgpt.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # --help exits through argparse
    code = e.code
heavy = sorted(m for m in ("torch", "ray", "deepspeed", "safetensors") if m in sys.modules)
print("HEAVY", heavy)
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["config", "jobs/tiny.toml"],
    ["plan", "jobs/tiny.toml", "--inventory", "cluster/inventory-hetero.toml", "--top", "2"],
    ["plan", "jobs/hetero.toml", "--inventory", "cluster/aws.yaml", "--top", "1"],
    ["cluster", "check", "cluster/kuberay/raycluster.yaml", "--job", "jobs/hetero.toml"],
])
def test_help_config_and_plan_import_no_torch(argv):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_the_controller_and_its_tests_import_no_ray():
    code = ("import sys, tests.unit.test_controller, distgpt.orchestrator.status, distgpt.orchestrator.drills, "
            "distgpt.orchestrator.growth, distgpt.planner.capacity, distgpt.planner.node_types; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_every_command_module_is_registered_and_reachable():
    paths = {c.path for c in registry()}
    assert {("train",), ("config",), ("plan",), ("generate",), ("data", "prepare"), ("checkpoint", "ls"),
            ("checkpoint", "export"), ("bench", "parallel"), ("cluster", "check"), ("bench", "autoscale")} <= paths


def test_old_train_keys_migrate_into_the_plan_with_a_warning(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text("[train]\nmicro_batch_size = 4\ndtype = 'bf16'\nglobal_batch_size = 8\n")
    with pytest.warns(ConfigWarning, match="train.micro_batch_size is now plan.micro_batch_size"):
        job = load_job(old)
    assert job.plan.micro_batch_size == 4 and job.plan.dtype == "bf16" and job.workload().dtype == "bf16"
    # an override of the old key still beats the file's new key (each source migrates on its own)
    new = tmp_path / "new.toml"
    new.write_text("[train]\nglobal_batch_size = 8\n[plan]\nmicro_batch_size = 4\n")
    with pytest.warns(ConfigWarning):
        assert load_job(new, ["--train.micro_batch_size=2"]).plan.micro_batch_size == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new layout warns about nothing
        assert load_job(new).plan.micro_batch_size == 4


def test_old_and_new_keys_that_disagree_are_one_error_naming_both(tmp_path):
    both = tmp_path / "both.toml"
    both.write_text("[train]\ndtype = 'bf16'\n[plan]\ndtype = 'fp32'\n")
    with pytest.raises(ConfigError) as err:
        load_job(both)
    assert len(err.value.problems) == 1
    assert "train.dtype: 'bf16' contradicts plan.dtype = 'fp32'" in err.value.problems[0]


def test_auto_plan_keeps_a_migrated_precision(tmp_path):
    job_file = tmp_path / "auto.toml"
    job_file.write_text("plan = 'auto'\n[train]\ndtype = 'bf16'\n")
    with pytest.warns(ConfigWarning):
        job = load_job(job_file)
    assert job.cluster.plan == "auto" and job.plan.dtype == "bf16"


def test_every_user_error_derives_from_one_base_and_exits_2(tmp_path, capsys):
    from distgpt.checkpoint.export import ModelDirError
    from distgpt.checkpoint.manager import CheckpointError
    from distgpt.data.loader import DatasetError
    from distgpt.planner.inventory import InventoryError
    from distgpt.storage import StorageError

    for cls in (ConfigError, CheckpointError, DatasetError, InventoryError, StorageError, ModelDirError):
        assert issubclass(cls, DistgptError)
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    for path in (bad, tmp_path / "missing.json"):
        assert main(["train", "jobs/tiny.toml", "--cluster.launcher=local", "--plan", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("distgpt: error:") and "--plan" in err and "Traceback" not in err


RAY_HOMES = ("distgpt/orchestrator/", "distgpt/tune/", "distgpt/infer/ray_serve.py",
             # benchmarks of Ray itself: Ray Train against distgpt's actors, the autoscaler's reaction times
             "distgpt/bench/ray_bench.py", "distgpt/bench/autoscale_bench.py")


def test_only_the_orchestrator_tune_and_the_serve_module_import_ray():
    import re

    root = REPO
    pattern = re.compile(r"^\s*(import ray\b|from ray[ .])", re.MULTILINE)
    offenders = [str(p.relative_to(root)) for p in sorted((root / "distgpt").rglob("*.py"))
                 if pattern.search(p.read_text()) and not str(p.relative_to(root)).startswith(RAY_HOMES)]
    assert not offenders, f"these modules import Ray; move the Ray code into orchestrator/ or tune/: {offenders}"


def test_every_command_group_and_command_prints_its_help():
    """argparse formats help lazily, so a stray '%' in one command's summary broke `distgpt bench --help` alone."""
    import argparse

    from distgpt.cli import build_parser

    def walk(parser: argparse.ArgumentParser) -> int:
        assert parser.format_help()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return 1 + sum(walk(p) for a in subs for p in a.choices.values())

    assert walk(build_parser()) > len(registry())  # every command, and each group above them
