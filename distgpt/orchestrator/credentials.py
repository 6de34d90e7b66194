"""Credentials written into a job's URIs travel to Ray workers as environment, never inside the job.

A job may name ``s3://KEY:SECRET@bucket/…`` or ``…?access_key=…&secret_key=…`` — convenient on one machine, but under
Ray the job is an argument of every actor: it sits in the object store and in each worker's memory, and anything
that shows an actor's arguments shows the secret. So before the controller is started, the credentials are taken out
of every URI and handed over as the standard AWS variables in the controller's ``runtime_env`` (which its worker
actors inherit); pyarrow reads them from there. Different credentials in different URIs cannot be carried that way:
that is refused, with the fix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from distgpt.checkpoint import signing
from distgpt.config import JobConfig
from distgpt.config_schema import ConfigError
from distgpt.redact import redact

ENV = {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY", "session_token": "AWS_SESSION_TOKEN"}
"""pyarrow's S3 URI options that are credentials → the variables its default credential chain reads."""


def split_credentials(job: JobConfig) -> tuple[JobConfig, dict[str, str]]:
    """(the job with no credentials in any URI, the environment that carries them — and the checkpoint signing key,
    when one is set here, so the workers sign and check manifests too)."""
    found: dict[str, set[str]] = {}
    where: dict[str, list[str]] = {}

    def strip(text: str) -> str:
        clean, creds = _strip_uri(text)
        for key, value in creds.items():
            found.setdefault(ENV[key], set()).add(value)
            where.setdefault(ENV[key], []).append(redact(text))
        return clean

    stripped = _map_strings(job, strip)
    clashes = sorted(k for k, v in found.items() if len(v) > 1)
    if clashes:
        raise ConfigError([f"URIs carry different credentials ({', '.join(clashes)}: {', '.join(where[clashes[0]])})"
                           " — under Ray they travel to workers as one set of AWS variables: set AWS_ACCESS_KEY_ID / "
                           "AWS_SECRET_ACCESS_KEY (or a profile) on the cluster's nodes and drop them from the URIs"],
                          "job")
    env = {k: next(iter(v)) for k, v in found.items()}
    if os.environ.get(signing.ENV):  # the checkpoint signing key: the workers sign and check manifests
        env[signing.ENV] = os.environ[signing.ENV]
    return stripped, env


def _strip_uri(text: str) -> tuple[str, dict[str, str]]:
    """(``text`` without the credentials of an s3:// URI, those credentials by pyarrow option name)."""
    if not text.startswith("s3://"):
        return text, {}
    try:
        parts = urlsplit(text)
        user, password = parts.username, parts.password
    except ValueError:  # not a URI any parser accepts: storage reports it (redacted) when it is used
        return text, {}
    creds: dict[str, str] = {}
    if user is not None:
        creds["access_key"] = unquote(user)
        if password is not None:
            creds["secret_key"] = unquote(password)
    query = parse_qsl(parts.query, keep_blank_values=True)
    creds.update({k: v for k, v in query if k in ENV})
    if not creds:
        return text, {}
    netloc = parts.netloc.rsplit("@", 1)[-1]
    kept = urlencode([(k, v) for k, v in query if k not in ENV], safe=":/")
    return urlunsplit((parts.scheme, netloc, parts.path, kept, parts.fragment)), creds


def _map_strings(value: Any, fn) -> Any:
    """``value`` (dataclasses, lists, tuples, dicts — keys too) with ``fn`` applied to every string in it."""
    if isinstance(value, str):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _map_strings(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, list | tuple):
        return type(value)(_map_strings(v, fn) for v in value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    return value
