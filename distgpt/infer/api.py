"""The OpenAI-compatible request bodies: parsed into typed requests, every problem a 400 naming the field.

Supported: ``/v1/completions`` (``prompt`` a string) and ``/v1/chat/completions`` (``messages``), with ``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``stream``, ``seed``, ``n`` = 1, and distgpt's ``top_k``. Fields OpenAI defines
that change nothing here (``user``, ``logit_bias`` …) are accepted and ignored; unknown fields are refused, so a typo
is not silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from distgpt.model.generate import SamplingConfig

IGNORED = {"model", "user", "logit_bias", "presence_penalty", "frequency_penalty", "logprobs", "echo", "suffix",
           "best_of", "stream_options", "response_format"}
COMMON = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "stream", "seed", "n"}


class BadRequest(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        """The JSON error body."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one server accepts."""

    max_prompt_tokens: int
    max_new_tokens: int
    max_concurrent: int


@dataclass(frozen=True)
class GenerationRequest:
    """A parsed completion or chat request."""

    prompt: str | None
    messages: list[tuple[str, str]] | None
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool = False
    """Streaming only: send token counts in a last chunk (OpenAI's ``stream_options.include_usage``)."""


def _number(body: dict, key: str, default: float, lo: float, hi: float, integer: bool = False) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise BadRequest(f"{key} must be {'an integer' if integer else 'a number'}, got {v!r}", key)
    if not lo <= v <= hi:
        raise BadRequest(f"{key} must be between {lo} and {hi}, got {v}", key)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stops)


def _messages(body: dict) -> list[tuple[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] needs role system|user|assistant and string content", "messages")
        out.append((m["role"], m["content"]))
    return out


def parse(body: object, chat: bool, limits: Limits) -> GenerationRequest:
    """Validate a request body against the API and the server's limits."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    allowed = COMMON | IGNORED | ({"messages"} if chat else {"prompt"})
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; this endpoint takes {sorted(allowed - IGNORED)}", unknown[0])
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise BadRequest("n must be 1", "n")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    default_new = min(16 if not chat else 256, limits.max_new_tokens)
    try:
        max_new = int(_number(body, key, default_new, 1, limits.max_new_tokens, integer=True))
    except BadRequest as e:
        raise BadRequest(f"{e.message} (the server's max_new_tokens limit is {limits.max_new_tokens})", key,
                         code="max_new_tokens_exceeded") from None
    sampling = SamplingConfig(
        max_new_tokens=max_new,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_k=int(_number(body, "top_k", 0, 0, 1 << 20, integer=True)),
        top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
        seed=(int(_number(body, "seed", 0, -(1 << 63), (1 << 63) - 1, integer=True)) if body.get("seed") is not None
              else None),
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    usage = bool(options.get("include_usage", False))
    if chat:
        return GenerationRequest(None, _messages(body), sampling, _stop(body), stream, usage)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string (one prompt per request)", "prompt")
    return GenerationRequest(prompt, None, sampling, _stop(body), stream, usage)
