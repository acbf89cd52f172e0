"""Digests: one per tensor for the index, sha256 per written file.

Every written byte is hashed twice, once for its tensor's index row and once for its file's
sha256 (the Hugging Face Hub's LFS object id, so the upload can use it instead of reading the
file again). The file digest must be sha256; the tensor digest need not be, and BLAKE3
(the ``blake3`` package, cryptographic like sha256) costs about a third of it per byte: 4.4
against 1.8 GB/s on one core of the 2-core development machine. Index rows written since say
which algorithm in ``digest_algorithm`` next to ``digest``; archives written before hold a
``sha256`` column instead, and :func:`index_digest` reads both, so readers call it and
:func:`tensor_digest`, never a hash function by name.

Example:
    >>> tensor_digest("blake3", b"abc")[:16]
    '6437b3ac38465133'
    >>> index_digest({"sha256": "ab" * 32})[0]
    'sha256'
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Protocol

import blake3

from exporter.errors import ArchiveError

#: The algorithm of the tensor digests written now.
TENSOR_DIGEST = "blake3"
ALGORITHMS = ("blake3", "sha256")
Buffer = bytes | bytearray | memoryview


class Hasher(Protocol):
    def update(self, data: Buffer, /) -> Any: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str = TENSOR_DIGEST) -> Hasher:
    """An incremental hasher of ``algorithm`` (``blake3`` or ``sha256``)."""
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ArchiveError(f"unknown digest algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")


def tensor_digest(algorithm: str, data: Buffer) -> str:
    """The hex digest of ``data`` with ``algorithm``, as the index records it."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


def index_digest(row: Mapping[str, Any]) -> tuple[str, str]:
    """``(algorithm, hex digest)`` of a tensor index row, old (``sha256`` column) or new."""
    if row.get("digest") is not None:
        return str(row["digest_algorithm"]), str(row["digest"])
    if row.get("sha256") is not None:
        return "sha256", str(row["sha256"])
    raise ArchiveError(f"index row of {row.get('name')!r} holds no tensor digest")
