"""A zip file's member table, read at C speed for the files torch writes.

A DeepSpeed ZeRO file of many small comm intervals holds a member per tensor (36,000 and
more), and an export opens eight such files per step. :mod:`zipfile` builds a ``ZipInfo`` per
member in pure Python (0.2 s for 36,000 members) and every local header then costs a
``pread``. Here the central directory is read in one ``pread`` and its fixed-size headers are
parsed with numpy; the local headers of all members are then read through a memory map of the
file, a window at a time, and checked together.

The fast reader accepts only the layout torch writes (caffe2/serialize/inline_container.cc,
``PyTorchStreamWriter``, through miniz with ``MZ_ZIP_FLAG_WRITE_ZIP64``): an end of central
directory record without comment at the very end of the file, optionally preceded by a ZIP64
end record and its locator (torch writes both even for small files), a central directory that
ends where they start, one disk, entries chained back to back, no encryption, and extra
fields that are either absent or one ZIP64 field. Anything else (a comment, bytes prepended
to the archive, a broken chain, other flags or extra fields, counts that disagree) makes it
return ``None``, and the caller falls back to :mod:`zipfile`, so odd files are read as
before. Section numbers below are those of PKWARE's APPNOTE.TXT (6.3.x).
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: End of central directory record (4.3.16), without its comment.
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD_SIGNATURE = 0x06054B50
#: ZIP64 end of central directory locator (4.3.15).
_LOCATOR = struct.Struct("<IIQI")
_LOCATOR_SIGNATURE = 0x07064B50
#: ZIP64 end of central directory record (4.3.14), without extensible data.
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_EOCD64_SIGNATURE = 0x06064B50
#: Its "size of zip64 end of central directory record" when there is no extensible data.
_EOCD64_BODY = _EOCD64.size - 12
_TAIL = _EOCD64.size + _LOCATOR.size + _EOCD.size

#: Central directory file header (4.3.12), 46 bytes before the name.
_CENTRAL = np.dtype([
    ("signature", "<u4"), ("made_by", "<u2"), ("needed", "<u2"), ("flags", "<u2"),
    ("method", "<u2"), ("time", "<u2"), ("date", "<u2"), ("crc", "<u4"),
    ("compressed", "<u4"), ("size", "<u4"), ("name_len", "<u2"), ("extra_len", "<u2"),
    ("comment_len", "<u2"), ("disk", "<u2"), ("internal", "<u2"), ("external", "<u4"),
    ("offset", "<u4"),
])
_CENTRAL_SIZE = 46
_CENTRAL_SIGNATURE = b"PK\x01\x02"
#: General purpose flags the fast reader accepts (4.4.4): bit 3 (sizes in a data descriptor:
#: torch's writer streams, so it sets it on every member) and bit 11 (UTF-8 names).
_KNOWN_FLAGS = 0x0808
_UTF8_NAMES = 0x0800
#: The ZIP64 extended information extra field (4.5.3) and the mark of a value stored there.
_ZIP64_TAG = 0x0001
_ZIP64_MARK = 0xFFFFFFFF
#: Highest "version needed to extract" zipfile reads (its MAX_EXTRACT_VERSION).
_MAX_EXTRACT_VERSION = 63

#: Local file header (4.3.7): 30 bytes before the name and the extra field.
LOCAL_HEADER_SIZE = 30
_LOCAL_SIGNATURE = 0x04034B50
#: Bytes of the file mapped at a time to read local headers. A ZeRO file of many comm
#: intervals has a header every few kB: reading the whole file to reach them copied all of its
#: bytes (241 MB, 0.04 s a file), where a map only touches the pages that hold a header. A
#: window bounds the file pages the map adds to this process's resident memory.
_MAP_WINDOW = 8 << 20

#: What :func:`local_headers` finds for each member; ``TorchZip.member`` names each refusal.
OK, COMPRESSED, BAD_HEADER, TRUNCATED_HEADER, PAST_END = range(5)


@dataclass(frozen=True, slots=True)
class Directory:
    """A zip member table: one entry per central directory header, in file order.

    ``header_offset`` is clipped to ``[-1, file_size]`` and ``size`` to ``file_size + 1`` so
    that both fit ``int64``: a clipped value fails the same bounds check its true value fails,
    and a value that passes them is unchanged.

    Attributes:
        names: member names, decoded as zipfile decodes them.
        compress_type: the compression method of each member (0: stored).
        header_offset: where each member's local header starts.
        size: each member's uncompressed size.
        fast: True when the numpy reader parsed the directory, False when zipfile did.
        raw: the central directory's bytes and where each header starts in them (the numpy
            reader's; :mod:`exporter.torchfile.likezip` compares the next file's with them).
    """

    names: list[str]
    compress_type: np.ndarray
    header_offset: np.ndarray
    size: np.ndarray
    fast: bool
    raw: tuple[bytes, np.ndarray] | None = None


def read_fast(path: Path, file_size: int) -> Directory | None:
    """The member table of the zip file at ``path`` if :func:`fast_directory` can read it.

    Never raises: a file it cannot open or read is left to :func:`read_with_zipfile` too,
    which reports the error as before.
    """
    try:
        with open(path, "rb", buffering=0) as fh:
            return fast_directory(fh.fileno(), file_size)
    except OSError:
        return None


def read_with_zipfile(path: Path, file_size: int) -> Directory:
    """The member table as :mod:`zipfile` reads it (which also copes with comments, bytes
    prepended to the archive and other writers' extra fields)."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    return Directory(
        names=[info.filename for info in infos],
        compress_type=np.array([info.compress_type for info in infos], dtype=np.int64),
        header_offset=np.array([min(max(info.header_offset, -1), file_size) for info in infos],
                               dtype=np.int64),
        size=np.array([min(info.file_size, file_size + 1) for info in infos], dtype=np.int64),
        fast=False,
    )


def fast_directory(fd: int, file_size: int) -> Directory | None:
    """The member table of a torch-written zip file, or None when the file is anything else.

    Reads the end records (4.3.14-4.3.16) and the whole central directory (4.3.12) in one
    ``pread`` each. Every header is found by its signature and the chain is verified: the first
    starts the directory, each one ends where the next starts, the last ends the directory,
    and their count is the end record's. That is exactly the walk zipfile makes, so the tables
    agree wherever this returns one.
    """
    found = central_directory(fd, file_size)
    if found is None:
        return None
    raw, starts = found
    data = np.frombuffer(raw, dtype=np.uint8)
    length = len(raw)
    heads = _gather(data, starts, _CENTRAL_SIZE).view(_CENTRAL).ravel()
    name_len = heads["name_len"].astype(np.int64)
    extra_len = heads["extra_len"].astype(np.int64)
    ends = starts + _CENTRAL_SIZE + name_len + extra_len + heads["comment_len"]
    if (ends[:-1] != starts[1:]).any() or ends[-1] != length:
        return None
    if (((heads["flags"] | _KNOWN_FLAGS) != _KNOWN_FLAGS).any() or (heads["disk"] != 0).any()
            or ((heads["needed"] & 0xFF) > _MAX_EXTRACT_VERSION).any()):
        return None
    names = _ascii_names(raw, starts + _CENTRAL_SIZE, name_len)
    if names is None:
        names = _names(data, starts + _CENTRAL_SIZE, name_len, heads["flags"])
    if names is None:
        return None
    sizes = heads["size"].astype(np.uint64)
    offsets = heads["offset"].astype(np.uint64)
    if extra_len.any() and not _decode_zip64(data, heads, starts + _CENTRAL_SIZE + name_len,
                                             extra_len, sizes, offsets):
        return None
    limit = np.uint64(file_size)
    return Directory(
        names=names,
        compress_type=heads["method"].astype(np.int64),
        header_offset=np.minimum(offsets, limit).astype(np.int64),
        size=np.minimum(sizes, limit + np.uint64(1)).astype(np.int64),
        fast=True,
        raw=(raw, starts),
    )


def central_directory(fd: int, file_size: int) -> tuple[bytes, np.ndarray] | None:
    """The central directory's bytes, and where each of its headers starts (found by their
    signatures: :func:`_header_starts`), where the end records locate it; else None."""
    located = locate_central_directory(fd, file_size)
    if located is None:
        return None
    offset, length, count = located
    raw = os.pread(fd, length, offset)
    if len(raw) != length:
        return None
    starts = _header_starts(np.frombuffer(raw, dtype=np.uint8), count)
    return None if starts is None else (raw, starts)


def locate_central_directory(fd: int, file_size: int) -> tuple[int, int, int] | None:
    """Offset, length and entry count of the central directory, from the end records.

    Only where the end record ends the file (no comment: zipfile's first guess too) and the
    directory ends where the end records start, so that zipfile's "concat" adjustment for
    bytes before the archive is zero and offsets need no shifting.
    """
    if file_size < _EOCD.size:
        return None
    tail_size = min(file_size, _TAIL)
    tail = os.pread(fd, tail_size, file_size - tail_size)
    if len(tail) != tail_size:
        return None
    (signature, disk, cd_disk, disk_entries, entries, length, offset,
     comment_len) = _EOCD.unpack_from(tail, tail_size - _EOCD.size)
    if signature != _EOCD_SIGNATURE or comment_len:
        return None
    end = file_size - _EOCD.size
    if tail_size >= _EOCD.size + _LOCATOR.size and _LOCATOR.unpack_from(
            tail, tail_size - _EOCD.size - _LOCATOR.size)[0] == _LOCATOR_SIGNATURE:
        if tail_size < _TAIL:
            return None
        _, locator_disk, record_offset, disks = _LOCATOR.unpack_from(tail, _EOCD64.size)
        (signature64, body, _, _, disk64, cd_disk64, disk_entries64, entries64, length64,
         offset64) = _EOCD64.unpack_from(tail, 0)
        end = file_size - _TAIL
        if (signature64 != _EOCD64_SIGNATURE or body != _EOCD64_BODY or locator_disk
                or disks != 1 or record_offset != end or disk64 or cd_disk64
                or disk_entries64 != entries64):
            return None
        # The 16- and 32-bit fields hold the same values, or all ones where they overflow.
        for short, full, ones in ((disk, 0, 0xFFFF), (cd_disk, 0, 0xFFFF),
                                  (disk_entries, entries64, 0xFFFF), (entries, entries64, 0xFFFF),
                                  (length, length64, 0xFFFFFFFF), (offset, offset64, 0xFFFFFFFF)):
            if short not in (full, ones):
                return None
        entries, length, offset = entries64, length64, offset64
    elif disk or cd_disk or disk_entries != entries:
        return None
    if entries == 0 or length < _CENTRAL_SIZE * entries or offset + length != end:
        return None
    return offset, length, entries


def _header_starts(data: np.ndarray, count: int) -> np.ndarray | None:
    """Where the ``count`` central directory headers start, if their signatures number
    exactly ``count`` and the first starts the directory (a signature inside a name or an
    extra field makes the count disagree)."""
    candidates = np.flatnonzero(data[: len(data) - 3] == _CENTRAL_SIGNATURE[0])
    for shift in (1, 2, 3):
        candidates = candidates[data[candidates + shift] == _CENTRAL_SIGNATURE[shift]]
    if len(candidates) != count or candidates[0] != 0 or \
            candidates[-1] + _CENTRAL_SIZE > len(data):
        return None
    return candidates.astype(np.int64)


def _gather(data: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` bytes at each of ``starts``, one row each (callers check the bounds).

    Indexing a sliding window view copies the rows in one pass, without an index per byte.
    """
    return sliding_window_view(data, width)[starts]


def _ascii_names(raw: bytes, starts: np.ndarray, lengths: np.ndarray) -> list[str] | None:
    """The member names when all of them are ASCII without a NUL byte (what torch writes):
    sliced out of the directory and decoded together; None otherwise (:func:`_names` decides).

    ASCII decodes the same under cp437 and UTF-8, whatever a name's UTF-8 flag says.
    """
    joined = b"\x00".join(map(raw.__getitem__, map(slice, starts.tolist(),
                                                     (starts + lengths).tolist())))
    if not joined.isascii() or joined.count(0) != len(lengths) - 1:
        return None
    return joined.decode("ascii").split("\x00")


def _names(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
           flags: np.ndarray) -> list[str] | None:
    """The member names, decoded in one call: joined by NUL bytes, decoded, split.

    zipfile decodes names flagged UTF-8 (4.4.4 bit 11) as UTF-8, the others as cp437, and cuts
    a name at its first NUL byte; names with a NUL, or non-ASCII names without the flag, are
    left to it. cp437 and UTF-8 agree on ASCII, and a NUL-joined string decodes as UTF-8
    exactly when each name does.
    """
    total = int(lengths.sum())
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    name_bytes = data[np.repeat(starts, lengths) + within]
    if not name_bytes.all():
        return None
    entry = np.repeat(np.arange(len(lengths)), lengths)  # the entry of each name byte
    if not (flags[entry[name_bytes >= 0x80]] & _UTF8_NAMES).all():
        return None
    joined = np.zeros(total + len(lengths) - 1, dtype=np.uint8)
    joined[entry + np.arange(total)] = name_bytes
    try:
        return joined.tobytes().decode("utf-8").split("\x00")
    except UnicodeDecodeError:
        return None


def _decode_zip64(data: np.ndarray, heads: np.ndarray, starts: np.ndarray,
                  extra_len: np.ndarray, sizes: np.ndarray, offsets: np.ndarray) -> bool:
    """Replace the sizes and offsets marked ``0xFFFFFFFF`` by their 64-bit values from the
    ZIP64 extra field (4.5.3: the values present, in the order uncompressed size, compressed
    size, local header offset). Returns False where an extra field is anything but one ZIP64
    field holding at least the marked values (zipfile's reading is left to decide those).
    """
    rows = np.flatnonzero(extra_len)
    if (extra_len[rows] < 4).any():
        return False
    at = starts[rows]
    field = _gather(data, at, 4).view("<u2").astype(np.int64)
    marked = [heads[name][rows] == _ZIP64_MARK for name in ("size", "compressed", "offset")]
    wanted = 8 * sum(m.astype(np.int64) for m in marked)
    if ((field[:, 0] != _ZIP64_TAG) | (field[:, 1] + 4 != extra_len[rows])
            | (field[:, 1] < wanted)).any():
        return False
    size_at = at + 4
    offset_at = size_at + 8 * (marked[0].astype(np.int64) + marked[1])
    for values, mark, where in ((sizes, marked[0], size_at), (offsets, marked[2], offset_at)):
        if mark.any():
            values[rows[mark]] = _gather(data, where[mark], 8).view("<u8").ravel()
    return True


def local_headers(fd: int, directory: Directory, file_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each member's data offset and outcome (``OK``, ``COMPRESSED``, ``BAD_HEADER``,
    ``TRUNCATED_HEADER``, ``PAST_END``), for all members at once.

    The data follows the local header (4.3.7), whose name and extra field lengths need not be
    the central directory's: torch pads the local extra field so that data starts on a 64-byte
    boundary (inline_container.cc, ``getPadding``), and reads the header back the same way
    (``PyTorchStreamReader::getRecordOffset``). Headers are read in file order, through windows
    of at most :data:`_MAP_WINDOW` bytes (:func:`_read_headers`).
    """
    count = len(directory.size)
    status = np.full(count, OK, dtype=np.int8)
    data_offset = np.zeros(count, dtype=np.int64)
    header = directory.header_offset
    compressed = directory.compress_type != zipfile.ZIP_STORED
    outside = ~compressed & ((header < 0) | (header >= file_size))
    status[compressed] = COMPRESSED
    status[outside] = BAD_HEADER
    wanted = np.flatnonzero(~compressed & ~outside)
    wanted = wanted[np.argsort(header[wanted], kind="stable")]
    rows, got = _read_headers(fd, header[wanted])
    signature = np.ascontiguousarray(rows[:, :4]).view("<u4")[:, 0]
    lengths = np.ascontiguousarray(rows[:, 26:30]).view("<u2").astype(np.int64)
    status[wanted[signature != _LOCAL_SIGNATURE]] = BAD_HEADER
    status[wanted[~got]] = TRUNCATED_HEADER
    data_offset[wanted] = header[wanted] + LOCAL_HEADER_SIZE + lengths[:, 0] + lengths[:, 1]
    past = (status == OK) & (directory.size > file_size - data_offset)
    status[past] = PAST_END
    return data_offset, status


def _read_headers(fd: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 30 bytes at each of ``offsets`` (sorted), and whether all of them could be read.

    The file's size is taken again here, and no byte past it is mapped: a header cut off by
    the end of the file is not read. (A file that shrinks *while* a window is mapped ends the
    process with ``SIGBUS``, as any read through a memory map does.)
    """
    rows = np.zeros((len(offsets), LOCAL_HEADER_SIZE), dtype=np.uint8)
    got = np.zeros(len(offsets), dtype=bool)
    ends = offsets + LOCAL_HEADER_SIZE
    first, count = 0, int(np.searchsorted(ends, os.fstat(fd).st_size, "right"))
    while first < count:  # one window after the other, each from a header on
        start = int(offsets[first]) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        last = max(first + 1, min(count, int(np.searchsorted(ends, start + _MAP_WINDOW, "right"))))
        rows[first:last], got[first:last] = _window_rows(
            fd, start, int(ends[last - 1]) - start, offsets[first:last] - start)
        first = last
    return rows, got


def _window_rows(fd: int, start: int, length: int, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The headers at ``at`` of the ``length`` bytes from ``start`` (a multiple of the map
    granularity), mapped, or read where the file cannot be mapped; and which of them the file
    holds whole."""
    try:
        mapped = mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=start)
    except (OSError, ValueError):  # a file system without memory maps
        buffer = np.empty(length, dtype=np.uint8)
        return _rows(buffer[: os.preadv(fd, [memoryview(buffer)], start)], at)
    try:
        return _rows(np.frombuffer(mapped, dtype=np.uint8), at)
    finally:
        try:
            mapped.close()
        except BufferError:  # a view held by an exception's frames: unmapped when freed
            pass


def _rows(data: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.zeros((len(at), LOCAL_HEADER_SIZE), dtype=np.uint8)
    inside = at + LOCAL_HEADER_SIZE <= len(data)
    if inside.any():
        rows[inside] = _gather(data, at[inside], LOCAL_HEADER_SIZE)
    return rows, inside
