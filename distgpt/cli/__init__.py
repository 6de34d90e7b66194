"""The ``distgpt`` command: one module per command group, each contributing ``Command`` entries to one registry.

Command modules import nothing heavy at module level (their ``run`` functions import what they need), so building the
parser — ``distgpt --help``, ``distgpt plan``, ``distgpt config`` — loads neither torch nor Ray. Every error a user can
fix derives from ``distgpt.errors.DistgptError`` and is caught once, here: one line on stderr, no traceback, and the
exit code of its class (2 for bad input, 1 for a run that failed). A new command group (``submit``, ``tune``,
``serve``, ``chat``) is a new module named in ``GROUPS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from distgpt.errors import DistgptError
from distgpt.redact import redact

GROUPS = ("train", "rl", "jobs", "tune", "config", "data", "tokenizer", "generate", "infer", "plan", "cluster",
          "checkpoint", "drill", "bench")
"""Modules of ``distgpt.cli`` that define commands, in the order ``--help`` lists them."""


@dataclass(frozen=True)
class Command:
    """One subcommand: ``path`` ('checkpoint', 'ls') places it; ``arguments`` adds its options; ``run`` gets the
    parsed arguments plus the leftover ``--section.key=value`` overrides and returns the exit code."""

    path: tuple[str, ...]
    help: str
    run: Callable[[argparse.Namespace, list[str]], int]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    group_help: str = ""
    """Help of the parent group (for the first command of a nested group, e.g. 'checkpoint commands')."""


def registry() -> list[Command]:
    """Every command of every group in ``GROUPS``."""
    return [c for name in GROUPS for c in importlib.import_module(f"distgpt.cli.{name}").COMMANDS]


def job_argument(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """The positional job file most commands take."""
    p.add_argument("job", nargs="?", default=default, help="job file (TOML or YAML), e.g. jobs/demo.toml")


def build_parser(commands: list[Command] | None = None) -> argparse.ArgumentParser:
    """The argument parser (subcommands take --section.key=value overrides after their arguments)."""
    parser = argparse.ArgumentParser(prog="distgpt", description="Train GPT models across many machines.",
                                     allow_abbrev=False)  # "--=1" or "--pl" must not match an option
    subs: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command",
                                                                                         required=True)}
    for cmd in commands if commands is not None else registry():
        for depth in range(1, len(cmd.path)):  # create the nested groups on first use
            prefix = cmd.path[:depth]
            if prefix not in subs:
                group = subs[prefix[:-1]].add_parser(prefix[-1], help=cmd.group_help, allow_abbrev=False)
                subs[prefix] = group.add_subparsers(dest=f"{'_'.join(prefix)}_command", required=True)
        p = subs[cmd.path[:-1]].add_parser(cmd.path[-1], help=cmd.help, allow_abbrev=False)
        cmd.arguments(p)
        p.set_defaults(func=cmd.run)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """distgpt's own warnings (a moved job key, a fallback it took) as one line, like its errors."""
    if category.__module__.startswith("distgpt."):
        print(f"distgpt: warning: {redact(str(message))}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    warnings.showwarning = _show_warning
    args, rest = build_parser().parse_known_args(argv)
    try:
        return args.func(args, rest)
    except DistgptError as e:
        print(f"distgpt: error: {redact(str(e))}", file=sys.stderr)  # a URI in a message never shows a secret
        return e.exit_code
    except KeyboardInterrupt:
        print("distgpt: interrupted", file=sys.stderr)
        return 130


__all__ = ["Command", "build_parser", "job_argument", "main", "registry"]
