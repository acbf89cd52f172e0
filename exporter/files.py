"""File helpers every stage shares: content digests and atomic writes.

Digests: the sha256 of a file is the Hub's LFS object id and the archive's file checksum; the
git blob id (``sha1("blob {size}\\0" + content)``, as ``git hash-object`` computes it) is what
the Hub's tree API lists as ``oid`` for files kept in git rather than LFS.

Atomic writes: every file is written under a temporary name in its destination folder
(:func:`temp_name`) and renamed into place when complete, so a reader or a resumed build never
sees half a file; :func:`is_temporary` recognises what an interrupted write left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from exporter.errors import HashingStopped

HASH_BLOCK = 8 << 20


def file_digests(path: Path, blob_id: bool = False,
                 stop: threading.Event | None = None) -> tuple[str, str | None]:
    """The sha256 of a file and, when asked, its git blob id, in one read.

    ``stop``: checked before each block read; once set, raises :class:`HashingStopped` (so a
    hash running in a thread ends within one block when its caller is interrupted).
    """
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False) if blob_id else None
    with open(path, "rb") as fh:
        while not (stop is not None and stop.is_set()) and (chunk := fh.read(HASH_BLOCK)):
            sha256.update(chunk)
            if blob is not None:
                blob.update(chunk)
    if stop is not None and stop.is_set():
        raise HashingStopped(str(path))
    return sha256.hexdigest(), blob.hexdigest() if blob is not None else None


def file_sha256(path: Path, stop: threading.Event | None = None) -> str:
    """The sha256 hex digest of a file's content (``stop``: see :func:`file_digests`)."""
    return file_digests(path, stop=stop)[0]


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def temp_name(path: Path) -> Path:
    """The temporary sibling a write of ``path`` goes to before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def partial_dir(path: Path) -> Path:
    """The temporary sibling folder a folder is built in before it is renamed into place."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a leftover temporary of an interrupted write."""
    return path.name.startswith(".") and (".tmp-" in path.name or ".partial-" in path.name)


@contextmanager
def atomic_open(path: Path, fsync: bool = True) -> Iterator[IO[bytes]]:
    """A binary file handle whose content appears at ``path`` only if the block completes.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "a" / "data.bin"
        >>> with atomic_open(target) as fh:
        ...     _ = fh.write(b"complete")
        >>> target.read_bytes()
        b'complete'
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as fh:
        fh.write(data)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON (no NaN) to ``path`` atomically."""
    text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))
