"""``distgpt bench gpu``: refused with the reason on a machine without CUDA; ``--smoke`` runs every check's code on
this CPU (a 2-rank gloo parity run against one rank, the MFU measurement, the checkpoint stall) and prints the table.
The GPU figures themselves come only from a GPU machine."""

from __future__ import annotations

import re

import pytest
import torch

from distgpt.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would run")
def test_without_a_gpu_the_command_says_so_and_exits_2(capsys):
    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible" in err and "--smoke" in err


def test_the_smoke_run_executes_every_check_and_prints_the_table(capsys):
    code = main(["bench", "gpu", "--smoke", "--steps", "3"])
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()[2:]}
    parity = rows["parity ddp dp2"]
    assert " yes " in parity and re.search(r"5 steps, losses within \d\.\de-\d\d of one rank", parity), out
    mfu = re.search(r"MFU tiny fp32 .* (\d+\.\d)% \(([\d,]+) tokens/s", out)
    assert mfu and float(mfu.group(1)) > 0 and int(mfu.group(2).replace(",", "")) > 0, out
    stall = re.search(r"checkpoint stall\s+(yes|NO)\s+async \d+ ms lost .* blocking \d+ ms", out)
    assert stall, out
    # the exit code is the checks' verdict: parity passed here, so only the stall row can fail it
    assert code == (1 if stall.group(1) == "NO" else 0)
    assert re.search(r"all checks: \d+ s", out)
