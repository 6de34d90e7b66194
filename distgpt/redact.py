"""The one redaction function: credentials in a URI never reach a terminal, a log, a stored file or another process.
Imports only ``re``, so the command layer can use it before anything heavy is loaded."""

from __future__ import annotations

import re

_URI = re.compile(r"""([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'"?#]*)(\?[^\s'"#]*)?(#[^\s'"]*)?""")
"""A URI inside any text: scheme, then authority and path, then an optional query string and fragment."""


def redact(text: str) -> str:
    """``text`` — a URI, or a message with URIs in it — with every URI's user info (``user:secret@``), query string
    (endpoint options, maybe keys) and fragment removed: safe to print, log, store or send. The one redaction
    function: every path that shows a URI goes through it. It parses nothing, so a URI no parser accepts (the
    ones most likely to be echoed in an error) is redacted too; an ``@`` anywhere before the query counts as the
    end of user info, since a secret may hold an unescaped ``/``."""
    def one(m: re.Match) -> str:
        rest = m.group(2)
        return m.group(1) + (rest.rsplit("@", 1)[1] if "@" in rest else rest)

    return _URI.sub(one, text)
