"""Job files and overrides as plain data: reading TOML/YAML, ``--a.b=value`` overrides, merging, and migrating keys
that moved to another section. Knows nothing of the sections themselves (``config.py`` declares them).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import tomllib

from distgpt.config_schema import ConfigError


class ConfigWarning(UserWarning):
    """A job file uses a key that has moved; it still works, and the warning says where the key lives now."""


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``--a.b=value`` strings → nested dict. Values parse as TOML (numbers, booleans, arrays), else stay strings."""
    out: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError([f"{arg}: overrides look like --section.key=value (e.g. --train.lr=3e-4)"], "overrides")
        key, raw = arg[2:].split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError([f"{arg}: no key before '=' — overrides look like --section.key=value "
                               "(e.g. --train.lr=3e-4)"], "overrides")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError([f"--{key}: {p} is set twice as a value and a table"], "overrides")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"{path}: no such job file — see jobs/ for examples"], str(path))
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise ConfigError([f"{path}: the top level must be a mapping of sections"], str(path))
            return data
    except (tomllib.TOMLDecodeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError([f"{path}: not valid {path.suffix[1:].upper()}: {e}"], str(path)) from None
    except Exception as e:  # yaml.YAMLError without importing yaml at module level
        raise ConfigError([f"{path}: not valid YAML: {e}"], str(path)) from None
    raise ConfigError([f"{path}: job files end in .toml, .yaml or .yml"], str(path))


def migrate(data: dict[str, Any], table: dict[tuple[str, str], tuple[str, str]], source: str, problems: list[str],
            moved: dict[str, str]) -> dict[str, Any]:
    """Move the keys of ``table`` ((old section, key) → (new section, key)) to their new section, one source
    (file or overrides) at a time, so an override of an old key still beats the file's new key. Both keys given
    with different values is a problem."""
    for (old_sec, key), (new_sec, new_key) in table.items():
        section = data.get(old_sec)
        if not isinstance(section, dict) or key not in section:
            continue
        old, new = f"{old_sec}.{key}", f"{new_sec}.{new_key}"
        value = section.pop(key)
        target = data.get(new_sec)
        if target == "auto" or target is None:  # plan = "auto" shorthand: keep it, add the moved key beside it
            target = {} if target is None else {"__auto__": True}
        if not isinstance(target, dict):
            continue  # the section's own type error is reported by the builder
        if new_key in target and target[new_key] != value:
            problems.append(f"{old}: {value!r} contradicts {new} = {target[new_key]!r} in {source} — {old} has "
                            f"moved to {new}; keep only {new}")
            continue
        data[new_sec] = {**target, new_key: value}
        moved[new] = old
        warnings.warn(f"{source}: {old} is now {new} (the Plan owns the micro-batch and the precision) — read as "
                      f"{new} = {value!r}; move it in the job file", ConfigWarning, stacklevel=3)
    return data


def as_written(problem: str, moved: dict[str, str]) -> str:
    """A problem about a moved key, named as the user wrote it (with where it lives now)."""
    for new, old in moved.items():
        if problem.startswith(f"{new}:"):
            return f"{old}:{problem[len(new) + 1:]} ({old} is now {new})"
    return problem
