"""``distgpt tokenizer extend --from MODEL --corpus TEXT --add N --out DIR``: a model whose tokenizer knows a new
language — N tokens learned on its text, appended (every old id unchanged), embedding rows grown (mean-initialised).
Continue pre-training from ``DIR`` with ``[init] from = "DIR"``."""

from __future__ import annotations

import argparse

from distgpt.cli import Command
from distgpt.config_schema import ConfigError


def extend(args: argparse.Namespace, overrides: list[str]) -> int:
    """Extend the model's tokenizer on the corpus and write the grown model."""
    if overrides:
        raise ConfigError([f"unexpected arguments: {' '.join(overrides)}"], "distgpt tokenizer extend")
    from dataclasses import replace

    from distgpt import storage
    from distgpt.checkpoint.export import save_model_dir
    from distgpt.checkpoint.layout import model_tokenizer_uri
    from distgpt.data.extend import ExtendError, extend_bpe, tokens_per_char
    from distgpt.data.prepare import documents
    from distgpt.data.sources import expand_sources
    from distgpt.data.tokenizer import tokenizer_from_json
    from distgpt.model.gpt import GPT
    from distgpt.train.init import initial_config, load_initial_weights

    tok = tokenizer_from_json(storage.read_bytes(model_tokenizer_uri(args.source)).decode())
    text = documents(expand_sources(args.corpus), "text", args.max_bytes)
    pieces = [p for doc in text for p in doc.split("\n\n") if p.strip()]  # paragraphs (poems, dialogues …)
    cut = len(pieces) - max(1, len(pieces) // 20)
    learn, held = pieces[:cut] or pieces, pieces[cut:]  # the report is on the tail the merges never saw
    try:
        new, added = extend_bpe(tok, learn, args.add)
    except ExtendError as e:
        raise ConfigError([f"--from {args.source}: {e}"], "distgpt tokenizer extend") from None
    cfg = initial_config(args.source)
    model = GPT(replace(cfg, vocab_size=max(cfg.vocab_size, new.vocab_size)))
    load_initial_weights(model, args.source)
    save_model_dir(args.out, model, model.cfg, new, {"extended_from": storage.redact(args.source), "added": added})
    print(f"added {added} tokens ({tok.vocab_size} → {new.vocab_size}); tokens per character on held-out text: "
          f"{tokens_per_char(tok, held):.3f} → {tokens_per_char(new, held):.3f}; wrote {args.out} — continue "
          f"pre-training with [init] from = \"{args.out}\"")
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, help="a model directory or checkpoint root")
    p.add_argument("--corpus", action="append", required=True, help="text of the new language (repeatable)")
    p.add_argument("--add", type=int, default=1000, help="new tokens to learn (default 1000)")
    p.add_argument("--out", required=True, help="where to write the extended model")
    p.add_argument("--max-bytes", type=int, default=50_000_000, help="read at most this much of the corpus")


COMMANDS = [Command(("tokenizer", "extend"), "teach a model's tokenizer a new language (appends tokens)", extend,
                    _arguments, group_help="tokenizer commands")]
