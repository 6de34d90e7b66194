"""URIs to ``pyarrow.fs`` filesystems: s3://, gs://, file:// and plain local paths.

S3 settings come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL``) or from URI query options (``?endpoint_override=127.0.0.1:9000&scheme=http``).
Error messages name the URI without its query string, so credentials passed there never reach a log.
"""

from __future__ import annotations

import posixpath
from urllib.parse import urlsplit

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage location cannot be used; the message says which and what to do."""


def redact(uri: str) -> str:
    """The URI without query string or user info: safe to print."""
    if "://" not in uri:  # a plain path, or a pseudo-source like builtin:python-stdlib
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{parts.path}"


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path inside it for ``uri``."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), posixpath.abspath(uri) if not uri.startswith("/") else uri
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with varied texts
        raise StorageError(f"cannot open {redact(uri)}: {type(e).__name__}: {e}") from None
    return fs, path


def join(uri: str, *names: str) -> str:
    """Append path components to a URI or path, keeping any query string at the end."""
    parts = urlsplit(uri)
    if "://" not in uri:
        return posixpath.join(uri, *names)
    path = posixpath.join(parts.path or "/", *names)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{path}{query}"


def read_bytes(uri: str) -> bytes:
    """Whole object at ``uri``."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{redact(uri)} does not exist") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``, creating parent directories where the filesystem has them."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str) -> bool:
    """Whether a file exists at ``uri``."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File
