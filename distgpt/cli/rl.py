"""``distgpt rl JOB``: reinforcement-learning fine-tuning — ``distgpt train`` with ``objective.kind = "pg"``: rollout
actors generate, the job's reward scores, the learner (any Plan, on Ray workers) takes policy-gradient steps."""

from __future__ import annotations

import argparse

from distgpt.cli import Command
from distgpt.cli.train import _arguments, train


def rl(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run the job as an RL job (the [rl] section says what to generate and how to reward it)."""
    return train(args, ["--objective.kind=pg", *overrides])


COMMANDS = [Command(("rl",), "fine-tune a trained model by reinforcement learning (rollout actors + a learner)",
                    rl, _arguments)]
