"""``distgpt chat``: a terminal conversation that streams each answer as it is generated.

The conversation is kept and re-sent as the prompt of every turn (in the model's chat template where it has one).
``/reset`` forgets it, ``/temp 0.7`` and ``/max 200`` change sampling, ``/quit`` (or Ctrl-D) leaves. Ctrl-C while an
answer streams stops that answer — what was shown stays in the conversation — and returns to the prompt.
The model runs in this process (``LocalBackend``) or behind a ``distgpt serve`` (``HttpBackend``).
"""

from __future__ import annotations

import http.client
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TextIO
from urllib.parse import urlsplit

from distgpt.data.tokenizer import Tokenizer
from distgpt.errors import DistgptError
from distgpt.infer.batcher import Batcher, generate_text
from distgpt.infer.template import conversation_prompt, has_template
from distgpt.model.generate import SamplingConfig

Messages = list[tuple[str, str]]


class ChatError(DistgptError):
    """The chat cannot reach its model (the message says where it looked)."""


class Backend(Protocol):
    """Where answers come from."""

    description: str

    def reply(self, messages: Messages, temperature: float, max_tokens: int) -> Iterator[str]: ...


class LocalBackend:
    """A model in this process, through the batcher."""

    def __init__(self, batcher: Batcher, tok: Tokenizer, name: str):
        self.batcher, self.tok = batcher, tok
        template = "its chat template" if has_template(tok) else "a plain User/Assistant transcript (no chat template)"
        self.description = f"{name}, in this process, with {template}"

    def reply(self, messages: Messages, temperature: float, max_tokens: int) -> Iterator[str]:
        """Stream the assistant's answer; closing the iterator cancels the generation."""
        p = conversation_prompt(self.tok, messages)
        room = self.batcher.runner.block_size - 1
        ids = p.ids[-room:]  # the oldest turns fall out of a full context
        return generate_text(self.batcher, self.tok, ids, SamplingConfig(max_tokens, temperature), p.stop,
                             p.stop_ids)


class HttpBackend:
    """A running ``distgpt serve``, through its streaming chat endpoint."""

    def __init__(self, url: str):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ChatError(f"--server {url!r}: give http://HOST:PORT of a `distgpt serve`")
        self.host, self.port = parts.hostname, parts.port or 80
        self.url = f"http://{self.host}:{self.port}"
        health = self._get("/health")
        self.description = f"{health.get('model', '?')} at {self.url}"
        self.max_new_tokens = int(health.get("limits", {}).get("max_new_tokens", 1 << 30))

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=300)

    def _get(self, path: str) -> dict:
        try:
            conn = self._connection()
            conn.request("GET", path)
            resp = conn.getresponse()
            return json.loads(resp.read() or b"{}")
        except (OSError, ValueError) as e:
            raise ChatError(f"no distgpt server answers at {self.url}{path} ({e}) — start one with "
                            "`distgpt serve MODEL`") from None

    def reply(self, messages: Messages, temperature: float, max_tokens: int) -> Iterator[str]:
        """Stream the answer over server-sent events; closing the iterator closes the connection (the server
        then cancels the request)."""
        body = {"messages": [{"role": r, "content": c} for r, c in messages], "stream": True,
                "temperature": temperature, "max_tokens": min(max_tokens, self.max_new_tokens)}
        conn = self._connection()
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                err = json.loads(resp.read() or b"{}").get("error", {})
                raise ChatError(f"the server refused the request ({resp.status}): {err.get('message', '?')}")
            for line in resp:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    return
                delta = json.loads(data)["choices"][0].get("delta", {})
                if delta.get("content"):
                    yield delta["content"]
        except OSError as e:
            raise ChatError(f"lost the server at {self.url}: {e}") from None
        finally:
            conn.close()


HELP = "/reset  forget the conversation · /temp T  sampling temperature · /max N  answer length · /quit"


@dataclass
class Settings:
    """Sampling settings the user changes with /temp and /max."""

    temperature: float = 0.7
    max_tokens: int = 200


def repl(backend: Backend, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
         temperature: float = 0.7, max_tokens: int = 200) -> int:
    """Run the conversation until /quit or end of input; returns the exit code."""
    messages: Messages = []
    settings = Settings(temperature, max_tokens)
    out.write(f"chatting with {backend.description}\n{HELP}\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D or /quit to leave)\n")
            continue
        if line == "/quit":
            return 0
        if line.startswith("/"):
            out.write(_command(line, messages, settings) + "\n")
        elif line:
            messages.append(("user", line))
            messages.append(("assistant", _answer(backend, messages, settings, out)))


def _command(line: str, messages: Messages, settings: Settings) -> str:
    """Apply one /command; the line to show."""
    cmd, _, arg = line.partition(" ")
    if cmd == "/reset":
        messages.clear()
        return "(conversation cleared)"
    if cmd == "/temp":
        try:
            value = float(arg)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 2:
            return "(/temp takes a temperature in [0, 2]; 0 is greedy)"
        settings.temperature = value
        return f"(temperature = {value})"
    if cmd == "/max":
        if not arg.strip().isdigit() or int(arg) < 1:
            return "(/max takes a positive number of tokens)"
        settings.max_tokens = int(arg)
        return f"(max tokens = {settings.max_tokens})"
    return f"(unknown command {cmd}) {HELP}"


def _answer(backend: Backend, messages: Messages, settings: Settings, out: TextIO) -> str:
    """Stream one answer to ``out``; Ctrl-C stops it and keeps what was shown."""
    shown: list[str] = []
    out.write("bot> ")
    pieces = backend.reply(messages, settings.temperature, settings.max_tokens)
    try:
        for piece in pieces:
            shown.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    except DistgptError as e:  # the server refused or went away: say so, keep the conversation
        out.write(f"(error: {e})")
    finally:
        pieces.close()
    out.write("\n")
    return "".join(shown).strip()
