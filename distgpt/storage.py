"""URIs to ``pyarrow.fs`` filesystems: s3://, gs://, file:// and plain local paths.

S3 settings come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL``) or from URI query options (``?endpoint_override=127.0.0.1:9000&scheme=http``).
Messages name a URI only through ``redact`` (no user info, no query string), so credentials passed in a URI never
reach a terminal, a log or a stored file.

The one storage module: URIs, whole-object reads and writes, listing, retries, redaction. Checkpoints add DCP's
reader and writer on top of it (``checkpoint/dcp_io.py``).
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from distgpt.errors import DistgptError
from distgpt.redact import redact

T = TypeVar("T")


class StorageError(DistgptError, RuntimeError):
    """A storage location cannot be used; the message says which and what to do."""


class StorageIOError(StorageError, OSError):
    """A read, write or listing the storage refused (a missing bucket, denied credentials, an unreachable endpoint):
    still an ``OSError``, so retries treat it as the I/O failure it is."""

    @property
    def transient(self) -> bool:
        """Whether waiting may help: the endpoint is unreachable or overloaded (not a missing bucket or a denial)."""
        return is_transient(str(self))


_TRANSIENT = ("NETWORK_CONNECTION", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "SLOW_DOWN", "THROTTLING",
              "REQUEST_TIMEOUT", "curlCode", "Connection reset", "Connection refused", "timed out", "Broken pipe",
              "Couldn't connect", "HTTP status 500", "HTTP status 502", "HTTP status 503", "HTTP status 504")
"""What pyarrow's S3 client (the AWS SDK, curl) and the OS say when a store is down, overloaded or cut off."""


def is_transient(message: str) -> bool:
    """Whether a storage error message describes an outage (worth waiting out) rather than a wrong request."""
    return any(t in message for t in _TRANSIENT)


@contextmanager
def _named(action: str, uri: str) -> Iterator[None]:
    """pyarrow's I/O errors (which may quote the whole URI, credentials and all) as one redacted StorageIOError."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, StorageError):
        raise
    except OSError as e:
        raise StorageIOError(f"cannot {action} {redact(uri)}: {redact(str(e))} — check that the bucket or directory "
                             "exists, the endpoint is reachable and the credentials allow it") from None


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path inside it for ``uri``."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), posixpath.abspath(uri) if not uri.startswith("/") else uri
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with varied texts
        raise StorageError(f"cannot open {redact(uri)}: {redact(str(e))}") from None
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
        with _named("read", uri), fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{redact(uri)} does not exist") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``, creating parent directories where the filesystem has them. All or nothing: no
    reader ever sees part of it, and a failed write (a full disk) leaves no file."""
    fs, path = resolve(uri)
    with _named("write", uri):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        if not isinstance(fs, pafs.LocalFileSystem):  # an object store makes an object visible only once complete
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{path}.tmp-{os.getpid()}"  # a file system shows a half-written file: write aside, then rename
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
        except BaseException:
            if fs.get_file_info(tmp).type == pafs.FileType.File:
                fs.delete_file(tmp)  # a full disk leaves nothing behind
            raise


def exists(uri: str) -> bool:
    """Whether a file exists at ``uri``."""
    fs, path = resolve(uri)
    with _named("look up", uri):
        return fs.get_file_info(path).type == pafs.FileType.File


def with_retries(fn: Callable[[], T], what: str, attempts: int = 4, base_delay: float = 0.5,
                 transient: tuple[type[BaseException], ...] = (OSError,),
                 describe: Callable[[BaseException], str] = lambda e: f"{type(e).__name__}: {e}") -> T:
    """Run ``fn``, retrying ``transient`` failures with exponential backoff (0.5 s, 1 s, 2 s …); a missing file is
    not transient. After the last attempt: StorageError naming ``what`` and the redacted cause."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except transient as e:
            if i == attempts - 1:
                tries = f" after {attempts} attempts" if attempts > 1 else ""
                raise StorageError(f"{what} failed{tries}: {redact(describe(e))}") from None
            time.sleep(base_delay * 2**i)
    raise AssertionError("unreachable")


def preflight(uri: str, what: str = "checkpoint location", attempts: int = 2) -> None:
    """Write, read back and delete a probe object: fail at start-up, not after an hour of training."""
    probe = join(uri, f".distgpt-probe-{os.getpid()}")
    try:
        with_retries(lambda: write_bytes(probe, b"ok"), f"writing to {redact(uri)}", attempts=attempts)
        assert read_bytes(probe) == b"ok"
        fs, path = resolve(probe)
        fs.delete_file(path)
    except (StorageError, OSError, AssertionError) as e:
        raise StorageError(f"{what} {redact(uri)} is not writable ({redact(str(e))}) — check the bucket or path "
                           f"exists and the credentials allow writing") from None


def list_dir(uri: str) -> list[pafs.FileInfo]:
    """Entries directly under ``uri`` (empty when it does not exist or is a file)."""
    fs, path = resolve(uri)
    try:
        with _named("list", uri):
            return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []


def delete_file(uri: str) -> None:
    """Remove the file at ``uri``."""
    fs, path = resolve(uri)
    with _named("delete", uri):
        fs.delete_file(path)


def delete_dir(uri: str) -> None:
    """Remove ``uri`` and everything under it."""
    fs, path = resolve(uri)
    with _named("delete", uri):
        fs.delete_dir(path)
