"""Zip files for the central directory tests: torch-like archives written by :mod:`zipfile`,
a sparse ZIP64 archive with members beyond 4 GiB, and byte patches of single header fields.

Field offsets are those of PKWARE's APPNOTE.TXT: central directory file header 4.3.12, end of
central directory record 4.3.16, ZIP64 end record and locator 4.3.14-4.3.15, ZIP64 extra
field 4.5.3.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
from pathlib import Path

import torch

#: Offsets of fields inside a central directory file header (4.3.12).
CENTRAL = {"needed": 6, "flags": 8, "method": 10, "compressed": 20, "size": 24,
           "name_len": 28, "extra_len": 30, "comment_len": 32, "disk": 34, "offset": 42}
_WIDTH = {"compressed": "<I", "size": "<I", "offset": "<I"}
_PADDING_TAG = 0x4246  # "FB": the extra field torch pads local headers with


def torch_bytes(value: object) -> bytes:
    """``torch.save`` of ``value`` into memory (prefix ``archive/``)."""
    out = io.BytesIO()
    torch.save(value, out)
    return out.getvalue()


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def rezip(members: list[tuple[str, bytes]], comment: bytes = b"", force_zip64: bool = False,
          extra: bytes = b"", compress: str = "") -> bytes:
    """The members written again by :mod:`zipfile` (stored; ``compress``: a member to deflate;
    ``extra``: an extra field for every member; duplicate names allowed)."""
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
            for name, body in members:
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                info.compress_type = (zipfile.ZIP_DEFLATED if name == compress
                                      else zipfile.ZIP_STORED)
                info.extra = extra
                with z.open(info, "w", force_zip64=force_zip64) as fh:
                    fh.write(body)
            z.comment = comment
    return out.getvalue()


def central_header(data: bytes, name: str) -> int:
    """Where the central directory header of member ``name`` starts."""
    raw = name.encode()
    at = data.rindex(b"PK\x05\x06")
    cd_offset = struct.unpack_from("<I", data, at + 16)[0]
    if cd_offset == 0xFFFFFFFF:
        cd_offset = struct.unpack_from("<Q", data, at - 20 - 56 + 48)[0]
    at = cd_offset
    while data[at + 46 : at + 46 + struct.unpack_from("<H", data, at + 28)[0]] != raw:
        at += 46 + sum(struct.unpack_from("<HHH", data, at + 28))
    return at


def patch_central(data: bytes, name: str, field: str, value: int) -> bytes:
    """Set one field of member ``name``'s central directory header."""
    at = central_header(data, name) + CENTRAL[field]
    packed = struct.pack(_WIDTH.get(field, "<H"), value)
    return data[:at] + packed + data[at + len(packed) :]


def patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    packed = struct.pack(fmt, value)
    at %= len(data)
    return data[:at] + packed + data[at + len(packed) :]


def write_sparse_zip64(path: Path, members: list[tuple[str, bytes | int]],
                       every_value: bool = False) -> None:
    """A torch-like ZIP64 archive; an ``int`` body is a hole of that many zero bytes.

    As torch's writer does (miniz with ``MZ_ZIP_FLAG_WRITE_ZIP64``): data aligned to 64
    bytes by an ``FB`` extra field in the local header, sizes and offsets of 4 GiB or more
    set to ``0xFFFFFFFF`` in the central directory and given in its ZIP64 extra field, and
    the ZIP64 end record and locator before the end record. The holes cost no disk space.
    ``every_value``: every size and offset goes to the ZIP64 field, however small.
    """
    central = []
    with open(path, "wb") as fh:
        for name, body in members:
            offset = fh.tell()
            raw = name.encode()
            size = body if isinstance(body, int) else len(body)
            local_extra = b""
            if size >= 0xFFFFFFFF:
                local_extra = struct.pack("<HHQQ", 1, 16, size, size)
            pad = -(offset + 30 + len(raw) + len(local_extra) + 4) % 64
            local_extra += struct.pack("<HH", _PADDING_TAG, pad) + b"Z" * pad
            fh.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0x0800, 0, 0, 0x21, 0,
                                 min(size, 0xFFFFFFFF), min(size, 0xFFFFFFFF), len(raw),
                                 len(local_extra)) + raw + local_extra)
            if isinstance(body, int):
                fh.seek(body, 1)
            else:
                fh.write(body)
            big_size = every_value or size >= 0xFFFFFFFF
            big_offset = every_value or offset >= 0xFFFFFFFF
            values = ([size, size] if big_size else []) + ([offset] if big_offset else [])
            extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values \
                else b""
            small = 0xFFFFFFFF if big_size else size
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x031E, 45, 0x0800,
                                       0, 0, 0x21, 0, small, small, len(raw), len(extra), 0, 0,
                                       0, 0, 0xFFFFFFFF if big_offset else offset) + raw + extra)
        cd_offset = fh.tell()
        directory = b"".join(central)
        fh.write(directory)
        record = fh.tell()
        count = len(central)
        fh.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, count, count,
                             len(directory), cd_offset))
        fh.write(struct.pack("<IIQI", 0x07064B50, 0, record, 1))
        fh.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF),
                             min(count, 0xFFFF), min(len(directory), 0xFFFFFFFF),
                             min(cd_offset, 0xFFFFFFFF), 0))
