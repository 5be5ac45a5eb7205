"""Whole-file writes through fsspec that never expose a partly written file under its final name.

On a local disk the bytes go to a temporary name in the same folder and are renamed into place (an
atomic rename). Object stores (s3://, gs://, ...) have no rename: fsspec's `mv` is a copy and a
delete, and a streamed upload that fails half-way may still be committed when its file object is
closed. There the whole object is sent in one request (`pipe_file`: a single PUT, or a multipart
upload that becomes visible only when completed), so a reader sees the old object, the new one or
none. Transient failures (connection resets, timeouts, throttling the client gave up on) are retried a
bounded number of times; errors that another try cannot fix (missing bucket, no permission) are not.
"""

from __future__ import annotations

import time
import uuid

import fsspec

ATTEMPTS = 4
FIRST_DELAY_SECONDS = 0.5
# Another try cannot fix these; every other OSError (the class s3fs and gcsfs map service and network
# errors to) may be transient.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def renames_atomically(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is a local filesystem, where a rename within a folder is atomic."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"file", "local"} & set(protocols))


def _put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if not renames_atomically(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    # A unique temporary name: a retried task may write the same file while its first try still runs.
    temporary = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with fs.open(temporary, "wb") as handle:
            handle.write(data)
        fs.mv(temporary, path)
    finally:
        if fs.exists(temporary):
            fs.rm(temporary)


def write_bytes(
    fs: fsspec.AbstractFileSystem,
    path: str,
    data: bytes,
    attempts: int = ATTEMPTS,
    first_delay: float = FIRST_DELAY_SECONDS,
) -> None:
    """Write `data` as the whole file `path`: readers see it complete or not at all.

    Args:
        fs: the filesystem (from `fsspec.core.url_to_fs`).
        path: the file's path on `fs`.
        data: the file's entire content.
        attempts: tries in all before a transient error is raised.
        first_delay: seconds before the second try; each later wait doubles.

    Raises:
        OSError: a permanent error at once, or the last transient one after `attempts` tries.
    """
    for attempt in range(attempts):
        try:
            _put(fs, path, data)
            return
        except PERMANENT_ERRORS:
            raise
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(first_delay * 2**attempt)
