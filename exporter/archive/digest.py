"""Tensor digests: the one place that checks bytes against the index, and names cache entries.

The tensor index records each tensor's digest (of its bytes as stored in the archive, computed
while it was written: ``exporter/convert/stream.py``) and its algorithm (``digest``,
``digest_algorithm``: BLAKE3 now; archives written before hold a ``sha256`` column, read as
``digest_algorithm="sha256"``: :mod:`exporter.convert.digest`). Readers call only
:func:`digest_key`, :func:`check_tensor_bytes` and :func:`digest_matches`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from exporter.convert.digest import index_digest, tensor_digest
from exporter.errors import IntegrityError


def digest_key(row: Mapping[str, Any]) -> str:
    """The content address of a tensor index row: ``"<algorithm>/<hex digest>"``.

    Example:
        >>> digest_key({"sha256": "ab" * 32})[:12]
        'sha256/ababa'
    """
    algorithm, digest = index_digest(row)
    return f"{algorithm}/{digest}"


def describe(row: Mapping[str, Any]) -> str:
    """How errors name a tensor: kind, name, step and file."""
    return f"{row['kind']} tensor {row['name']!r} of step {row['step']} ({row['file']})"


def digest_matches(data: bytes | bytearray | memoryview, row: Mapping[str, Any]) -> bool:
    """Whether ``data`` are the bytes the index row records (:func:`check_tensor_bytes`)."""
    try:
        check_tensor_bytes(data, row)
    except IntegrityError:
        return False
    return True


def check_tensor_bytes(data: bytes | bytearray | memoryview, row: Mapping[str, Any]) -> None:
    """Raise unless ``data`` are the bytes the index row records (length and digest).

    Args:
        data: the tensor's raw bytes as read.
        row: its tensor index row (``data_offset_begin``/``end``, the digest column, and the
            names used in the message).

    Raises:
        IntegrityError: wrong length or digest; the message names the tensor.

    Example:
        >>> import hashlib
        >>> row = {"kind": "model", "name": "w", "step": 0, "file": "steps/step0/model.safetensors",
        ...        "data_offset_begin": 0, "data_offset_end": 2,
        ...        "sha256": hashlib.sha256(b"ab").hexdigest()}
        >>> check_tensor_bytes(b"ab", row)
        >>> check_tensor_bytes(b"ax", row)
        Traceback (most recent call last):
        ...
        exporter.errors.IntegrityError: model tensor 'w' of step 0 (steps/step0/model.safetensors): sha256 of the bytes read is 5e85370e555e..., the index records fb8e20fc2e4c...
    """
    expected_length = int(row["data_offset_end"]) - int(row["data_offset_begin"])
    if len(data) != expected_length:
        raise IntegrityError(f"{describe(row)}: read {len(data)} bytes, the index records "
                             f"{expected_length}")
    algorithm, expected = index_digest(row)
    got = tensor_digest(algorithm, data)
    if got != expected:
        raise IntegrityError(f"{describe(row)}: {algorithm} of the bytes read is {got[:12]}..., "
                             f"the index records {expected[:12]}...")
