"""What a torch file's zip end records say, read without reading the archive: hints that
order and share the reads of a step's partition files (how many storages a pickle has, which
files have one pickle), never proofs. Each reads the file's last bytes and, for the pickle's
signature, the first central directory header (:mod:`exporter.torchfile.zipdir`)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from exporter.torchfile.zipdir import locate_central_directory

#: Central directory file header (APPNOTE 4.3.12): 46 bytes, then the name and extra field.
_CENTRAL = struct.Struct("<4s12xIIIHHH12x")
_CENTRAL_SIGNATURE = b"PK\x01\x02"
#: Bytes read after the first central header for its name and extra field.
_NAMES = 1024


def member_count(path: Path) -> int | None:
    """How many members the end records of the zip file at ``path`` announce (None where
    :func:`~exporter.torchfile.zipdir.fast_directory` would not read them): a measure of a
    torch file's pickle without reading it, one member per storage. Never raises."""
    try:
        with open(path, "rb", buffering=0) as fh:
            found = locate_central_directory(fh.fileno(), os.fstat(fh.fileno()).st_size)
    except OSError:
        return None
    return found[2] if found else None


def pickle_signature(path: Path) -> bytes | None:
    """The CRC-32, sizes and extra field that the central directory records for the torch
    file's ``data.pkl``, where it is the first member (torch writes it first): files whose
    signatures differ have different pickles, and files whose signatures agree almost always
    have one. None where not found. Never raises."""
    try:
        with open(path, "rb", buffering=0) as fh:
            fd = fh.fileno()
            found = locate_central_directory(fd, os.fstat(fd).st_size)
            if found is None:
                return None
            offset, length, _ = found
            head = os.pread(fd, min(length, _CENTRAL.size + _NAMES), offset)
    except OSError:
        return None
    if len(head) < _CENTRAL.size:
        return None
    signature, crc, compressed, size, name_len, extra_len, comment_len = _CENTRAL.unpack_from(head)
    name_end = _CENTRAL.size + name_len
    extra_end = name_end + extra_len
    name = head[_CENTRAL.size:name_end]
    if (signature != _CENTRAL_SIGNATURE or extra_end > len(head)
            or not (name == b"data.pkl" or name.endswith(b"/data.pkl"))):
        return None
    return struct.pack("<III", crc, compressed, size) + head[name_end:extra_end]


def pickle_size(signature: object) -> int | None:
    """The pickle's size in bytes that a :func:`pickle_signature` records (None where it has
    none, or the directory defers it to a ZIP64 field)."""
    if not isinstance(signature, bytes) or len(signature) < 12:
        return None
    size = struct.unpack_from("<I", signature, 8)[0]
    return None if size == 0xFFFFFFFF else size
