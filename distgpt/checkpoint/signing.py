"""Manifests signed with a key the user holds, so tampering is detected, not only corruption.

A manifest lists the size and sha256 of every file of its checkpoint, and every file a load reads is checked against
it — but it sits in the same bucket, so whoever can rewrite a shard can rewrite the manifest too. With
``DISTGPT_CHECKPOINT_KEY`` set (any secret string; the same on every node — under Ray distgpt hands it to the
workers as environment), each manifest carries an HMAC-SHA256 of its own content under that key, and a load refuses a
manifest that is unsigned or whose signature does not match. Without the key nothing is signed or checked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

ENV = "DISTGPT_CHECKPOINT_KEY"
FIELD = "hmac_sha256"


def _key() -> bytes | None:
    key = os.environ.get(ENV, "")
    return key.encode() if key else None


def _digest(key: bytes, manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != FIELD}
    return hmac.new(key, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def sign(manifest: dict) -> dict:
    """``manifest`` with its signature when a key is set (unchanged otherwise)."""
    key = _key()
    return {**manifest, FIELD: _digest(key, manifest)} if key else manifest


def problem(manifest: dict) -> str | None:
    """Why ``manifest`` fails the signature check under the key set (None: it passes, or no key is set)."""
    key = _key()
    if key is None:
        return None
    given = manifest.get(FIELD)
    if not isinstance(given, str):
        return (f"is not signed, and {ENV} is set — it was written without the key (unset {ENV} to load it "
                "unchecked, if you trust it)")
    if not hmac.compare_digest(given, _digest(key, manifest)):
        return f"does not match its signature under {ENV}: it was changed after it was written, or the key differs"
    return None
