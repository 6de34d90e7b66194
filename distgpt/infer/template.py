"""From a conversation to the prompt a model answers: the chat template where the model was tuned on one.

A model fine-tuned with ``objective.kind = "sft"`` has the chat markers in its tokenizer (``data.chat``): the prompt
is the rendered conversation plus the assistant marker, and the answer ends at the end-of-turn token. A model that
never saw the template (pre-trained only) gets a plain transcript ("User: …\\nAssistant:") and stops at the next
"\\nUser:" — the best a base model can do, and said so in ``distgpt chat``'s banner.
"""

from __future__ import annotations

from dataclasses import dataclass

from distgpt.data.chat import chat_prompt, stop_ids
from distgpt.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """What to feed and where to stop."""

    ids: list[int]
    stop: tuple[str, ...]
    stop_ids: frozenset[int]
    templated: bool
    """True when the model's own chat template was used."""


def conversation_prompt(tok: Tokenizer, messages: list[tuple[str, str]]) -> Prompt:
    """The prompt asking for the assistant's next turn after ``messages`` ((role, text) pairs)."""
    ids = chat_prompt(tok, messages)
    if ids is not None:
        return Prompt(ids, (), frozenset(stop_ids(tok)), True)
    lines = [f"{role.capitalize()}: {text}" for role, text in messages]
    text = "\n".join(lines) + "\nAssistant:"
    return Prompt(tok.encode(text), ("\nUser:", "\nSystem:"), frozenset({tok.eot_id}), False)


def has_template(tok: Tokenizer) -> bool:
    """Whether the tokenizer carries the chat markers (the model was fine-tuned on conversations)."""
    return chat_prompt(tok, []) is not None
