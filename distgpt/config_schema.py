"""Generic, typed dict → dataclass conversion that collects every problem instead of stopping at the first.

Kept apart from ``config.py`` (which declares the job's sections) so the sections read as plain documentation.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from distgpt.errors import DistgptError


class ConfigError(DistgptError, ValueError):
    """One or more problems in a job configuration, each naming the key and the fix."""

    def __init__(self, problems: list[str], source: str = "job config"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if get_origin(tp) is dict:
        return f"table of {_type_name(get_args(tp)[0])} → {_type_name(get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def check_value(tp: Any, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits type ``tp``; returns (ok, value converted where lossless, e.g. int → float)."""
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return value in get_args(tp), value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            ok, v = check_value(arg, value)
            if ok:
                return True, v
        return False, value
    if origin is dict:  # TOML tables / YAML mappings of one key and one value type
        if not isinstance(value, dict):
            return False, value
        kt, vt = get_args(tp)
        conv = {k: check_value(vt, v) for k, v in value.items()}
        ok = all(check_value(kt, k)[0] and c[0] for k, c in conv.items())
        return ok, {k: c[1] for k, c in conv.items()}
    if origin in (list, tuple):  # tuple[X, ...] fields take TOML arrays too
        if not isinstance(value, (list, tuple)):
            return False, value
        conv = [check_value(get_args(tp)[0], v) for v in value]
        out = [v for _, v in conv]
        return all(ok for ok, _ in conv), tuple(out) if origin is tuple else out
    if tp is type(None):
        return value is None, value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``data``; append 'prefix.key: …' problems; nested dataclasses recurse."""
    if not isinstance(data, dict):
        problems.append(f"{prefix}: expected a table of settings, got {type(data).__name__}")
        data = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    keys = {key_of(n): n for n in names}  # a field named for a Python keyword is written without its underscore
    for key in data:
        if key not in keys:
            near = difflib.get_close_matches(str(key), list(keys), n=1)
            hint = f" — did you mean {prefix}.{near[0]}?" if near else f" — known keys: {', '.join(keys)}"
            problems.append(f"{prefix}.{key}: unknown key{hint}")
    kwargs = {}
    for key, name in keys.items():
        if key not in data:
            continue
        tp, value = hints[name], data[key]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, f"{prefix}.{key}", problems)
            continue
        ok, conv = check_value(tp, value)
        if ok:
            kwargs[name] = conv
        else:
            problems.append(f"{prefix}.{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return cls(**kwargs)


def key_of(field_name: str) -> str:
    """The key a job file uses for a field: ``from_`` is written ``from`` (Python keywords take an underscore)."""
    base = field_name[:-1]
    return base if field_name.endswith("_") and keyword.iskeyword(base) else field_name


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass tree as plain dicts, keyed as job files write them (for logs and checkpoints)."""
    def keyed(v: Any) -> Any:
        return {key_of(k): keyed(x) for k, x in v.items()} if isinstance(v, dict) else v

    return keyed(dataclasses.asdict(obj))
