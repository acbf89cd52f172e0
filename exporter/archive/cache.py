"""A local cache of tensors read by byte range, addressed by their digest.

A tensor read from a Hub archive is stored under its index digest
(``ROOT/sha256/ab/abcdef...``), so a second read (of any step, revision or repository that
holds the same bytes) reads the local file, and ``HF_HUB_OFFLINE=1`` serves what was read
before. The default root is huggingface_hub's assets cache for this library
(``cached_assets_path("neox-exporter", "tensors")``, under ``HF_ASSETS_CACHE``). Entries are
written whole under a temporary name and renamed into place, and only after their digest was
checked, so a present entry is complete; readers check an entry's digest again when they use
it, and read a damaged one anew.

The cache also remembers which commit a branch resolved to (``refs/``), so an archive opened
offline by branch name reads the revision it read online.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from exporter.files import write_bytes_atomic

_KEY = re.compile(r"^[a-z0-9]+/[0-9a-f]{16,128}$")


def default_cache_dir() -> Path:
    """The default cache root under the Hugging Face assets cache."""
    from huggingface_hub import cached_assets_path

    return Path(cached_assets_path(library_name="neox-exporter", namespace="tensors"))


class TensorCache:
    """Content-addressed tensor bytes under ``root``.

    Example:
        >>> import hashlib, tempfile
        >>> cache = TensorCache(tempfile.mkdtemp())
        >>> key = "sha256/" + hashlib.sha256(b"abcd").hexdigest()
        >>> cache.get(key) is None
        True
        >>> _ = cache.put(key, b"abcd")
        >>> bytes(cache.get(key))
        b'abcd'
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        """Where the entry for ``key`` (``"sha256/<hex>"``) lives."""
        if not _KEY.match(key):
            raise ValueError(f"not a digest key: {key!r}")
        algorithm, digest = key.split("/")
        return self.root / algorithm / digest[:2] / digest

    def get(self, key: str) -> bytearray | None:
        """The cached bytes of ``key`` (a private, writable copy), or None."""
        path = self.path(key)
        try:
            with open(path, "rb") as fh:
                data = bytearray(os.fstat(fh.fileno()).st_size)
                fh.readinto(data)
        except FileNotFoundError:
            return None
        return data

    def put(self, key: str, data: bytes | bytearray | memoryview) -> Path:
        """Store ``data`` (already checked against ``key``) under ``key``; returns its path."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Replaces what is there (readers store only what they found missing or damaged); a
        # unique temporary name, since threads may store the same digest at once.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # a full disk leaves no partial entry behind
            raise
        return path

    def ref_path(self, repo_id: str, revision: str) -> Path:
        return self.root / "refs" / "datasets" / repo_id / revision

    def remember_ref(self, repo_id: str, revision: str, commit: str) -> None:
        """Record that ``revision`` of the dataset ``repo_id`` resolved to ``commit``."""
        write_bytes_atomic(self.ref_path(repo_id, revision), commit.encode())

    def recall_ref(self, repo_id: str, revision: str) -> str | None:
        """The commit ``revision`` resolved to when last online, or None."""
        path = self.ref_path(repo_id, revision)
        return path.read_text().strip() if path.is_file() else None
