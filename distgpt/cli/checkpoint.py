"""``distgpt checkpoint ls ROOT`` and ``distgpt checkpoint export ROOT --out DIR``."""

from __future__ import annotations

import argparse
import time

from distgpt.cli import Command
from distgpt.redact import redact


def ls(args: argparse.Namespace, overrides: list[str]) -> int:
    """List checkpoints with step, size, status, save time and Plan."""
    from distgpt.checkpoint.manager import list_checkpoints

    rows = list_checkpoints(args.root)
    if not rows:
        print(f"no checkpoints under {redact(args.root)}")
    for r in rows:
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.saved)) if r.saved else ""
        print(f"step {r.step:>8}  {r.bytes / 2**20:9.2f} MiB  {r.status:9}  {saved:19}  {r.plan}")
    return 0


def export(args: argparse.Namespace, overrides: list[str]) -> int:
    """Consolidate one checkpoint into a safetensors model directory."""
    from distgpt.checkpoint.export import export_checkpoint

    step = export_checkpoint(args.root, args.out, args.step, args.trust_pickled_metadata)
    out = redact(args.out)
    print(f"exported step {step} to {out} — try: distgpt generate --checkpoint {out} --prompt '...'")
    return 0


def _ls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="checkpoint root (a run's checkpoint.uri)")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, help="default: the latest committed")
    p.add_argument("--trust-pickled-metadata", action="store_true",
                   help="also read a checkpoint an earlier distgpt wrote, whose index is a pickle: unpickling runs "
                        "any code the file holds, so only for checkpoints you trust")


COMMANDS = [
    Command(("checkpoint", "ls"), "list checkpoints with step, size and status", ls, _ls_arguments,
            group_help="checkpoint commands"),
    Command(("checkpoint", "export"), "write one consolidated safetensors model (+ config, tokenizer)", export,
            _export_arguments),
]
