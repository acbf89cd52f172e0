"""Safetensors headers (and the index of ``.safetensors.zst`` files), validated before any
tensor byte is mapped or decompressed.

The format (safetensors ``README.md`` "Format", and ``safetensors/src/tensor.rs``
``SafeTensors::read_metadata`` / ``Metadata::validate``, which this follows):

- 8 bytes: ``N``, an unsigned little-endian 64-bit integer, the size of the header;
- ``N`` bytes: a UTF-8 JSON object that begins with ``{`` (trailing spaces allowed), mapping
  each tensor name to ``{"dtype", "shape", "data_offsets": [BEGIN, END]}``, plus an optional
  ``__metadata__`` map of strings to strings; ``N`` is at most 100,000,000
  (``MAX_HEADER_SIZE``);
- the data section: offsets are relative to its start; the tensors cover it entirely, with
  no holes and no overlap, and ``END - BEGIN`` is the tensor's element count times its
  element size.

:func:`validate_header` enforces all of it, plus what the loader needs on top: dtypes the
archive knows (``exporter.records.TORCH_DTYPES``), at most 64 non-negative dimensions whose
product fits an int64. :func:`check_row` then requires the index row and the header to agree.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from exporter.errors import ArchiveError
from exporter.records import SAFETENSORS_DTYPES, TORCH_DTYPES

#: safetensors/src/tensor.rs ``MAX_HEADER_SIZE``
MAX_HEADER_BYTES = 100_000_000
#: the same bound as the checkpoint reader (exporter/torchfile/records.py ``_MAX_DIMS``)
MAX_DIMS = 64
MAX_INT64 = 2**63 - 1
#: largest raw frame of a ``.safetensors.zst`` file: the decompressor allocates this much
MAX_FRAME_BYTES = 1 << 30
#: element size of each safetensors dtype the archive knows
ITEMSIZE: dict[str, int] = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}
#: the index's ``dtype`` column (torch spelling) -> safetensors spelling
INDEX_DTYPES: dict[str, str] = {str(d).removeprefix("torch."): n for d, n in SAFETENSORS_DTYPES.items()}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorEntry:
    """One validated header entry; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: its entries in data order, metadata, and where the data lies."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    data_size: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def shape_of(value: object, label: str, name: str) -> tuple[int, ...]:
    """A shape: at most :data:`MAX_DIMS` integers in ``[0, 2**63)`` whose product (zeros
    counted as one, as strides are) fits an int64."""
    if not isinstance(value, list) or len(value) > MAX_DIMS or not all(
            _is_int(d) and 0 <= d <= MAX_INT64 for d in value):
        raise ArchiveError(f"{label}: tensor {name!r}: shape {_short(value)} is not a list of at "
                           f"most {MAX_DIMS} non-negative integers")
    if math.prod(max(d, 1) for d in value) > MAX_INT64:
        raise ArchiveError(f"{label}: tensor {name!r}: shape {value} has more elements than an "
                           "int64 counts")
    return tuple(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _entry(name: str, value: object, data_size: int, label: str) -> TensorEntry:
    if not isinstance(value, dict) or set(value) != _ENTRY_KEYS:
        raise ArchiveError(f"{label}: tensor {name!r}: entry {_short(value)} is not "
                           "{dtype, shape, data_offsets}")
    dtype = value["dtype"]
    if dtype not in ITEMSIZE:
        raise ArchiveError(f"{label}: tensor {name!r}: unknown dtype {_short(dtype)} "
                           f"(known: {', '.join(ITEMSIZE)})")
    shape = shape_of(value["shape"], label, name)
    offsets = value["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise ArchiveError(f"{label}: tensor {name!r}: data_offsets {_short(offsets)} are not two "
                           "integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise ArchiveError(f"{label}: tensor {name!r}: data_offsets [{begin}, {end}] run outside "
                           f"the data section of {data_size} bytes")
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise ArchiveError(f"{label}: tensor {name!r}: data_offsets [{begin}, {end}] hold "
                           f"{end - begin} bytes, but {dtype} {list(shape)} needs {expected}")
    return TensorEntry(name, dtype, shape, begin, end)


def validate_header(raw_header: bytes, data_size: int, label: str) -> dict[str, TensorEntry]:
    """The tensor entries of a safetensors header, in data order, once all of them are valid.

    Args:
        raw_header: the ``N`` header bytes (after the 8-byte length).
        data_size: bytes in the data section (file size minus ``8 + N``).
        label: names the file in errors.

    Raises:
        ArchiveError: any rule of the module docstring is broken; the message names the file
            and the tensor.
    """
    return _parse(raw_header, data_size, label)[0]


def _parse(raw_header: bytes, data_size: int,
           label: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    if not raw_header.startswith(b"{"):
        raise ArchiveError(f"{label}: corrupt safetensors header (does not begin with '{{')")
    try:
        parsed = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"{label}: corrupt safetensors header: {_short(str(exc))}") from exc
    if not isinstance(parsed, dict):
        raise ArchiveError(f"{label}: corrupt safetensors header (not a JSON object)")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ArchiveError(f"{label}: __metadata__ is not a map of strings to strings")
    entries = sorted((_entry(name, value, data_size, label) for name, value in parsed.items()),
                     key=lambda e: (e.begin, e.end))
    position, previous = 0, None
    for entry in entries:
        if entry.begin < position:
            raise ArchiveError(f"{label}: tensors {previous!r} and {entry.name!r} overlap "
                               f"(bytes {entry.begin}-{position})")
        if entry.begin > position:
            raise ArchiveError(f"{label}: bytes {position}-{entry.begin} before tensor "
                               f"{entry.name!r} belong to no tensor")
        position, previous = entry.end, entry.name
    if position != data_size:
        raise ArchiveError(f"{label}: bytes {position}-{data_size} at the end belong to no tensor")
    return {e.name: e for e in entries}, metadata


def read_safetensors_header(fh: BinaryIO, label: str) -> SafetensorsHeader:
    """Read and validate the header of the open safetensors file ``fh`` (nothing else).

    Example:
        >>> import io
        >>> raw = b'{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}'
        >>> f = io.BytesIO(struct.pack("<Q", len(raw)) + raw + bytes(4))
        >>> read_safetensors_header(f, "w.safetensors").entries["w"].shape
        (2,)
    """
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(0)
    prefix = fh.read(8)
    if len(prefix) != 8:
        raise ArchiveError(f"{label}: not a safetensors file ({size} bytes)")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise ArchiveError(f"{label}: corrupt safetensors header (length {length} for a file "
                           f"of {size} bytes; at most {MAX_HEADER_BYTES})")
    entries, metadata = _parse(fh.read(length), size - 8 - length, label)
    return SafetensorsHeader(entries, metadata, 8 + length, size - 8 - length)


def check_row(row: Mapping[str, Any], header: SafetensorsHeader, index_label: str,
              file_label: str) -> TensorEntry:
    """The header entry of an index row, refused unless dtype, shape and byte range agree.

    The index stores absolute file offsets (``data_offset_begin`` / ``_end``); the header's
    are relative to the data section (``data_start`` further on).
    """
    name = row["name"]
    entry = header.entries.get(name)
    if entry is None:
        raise ArchiveError(f"{index_label}: {row['kind']} tensor {name!r} is not in {file_label}")
    said = (INDEX_DTYPES.get(row["dtype"], row["dtype"]), tuple(row["shape"]),
            row["data_offset_begin"], row["data_offset_end"])
    found = (entry.dtype, entry.shape, header.data_start + entry.begin,
             header.data_start + entry.end)
    if said != found:
        raise ArchiveError(
            f"{index_label}: {row['kind']} tensor {name!r}: the index says {said[0]} "
            f"{list(said[1])} at bytes {said[2]}-{said[3]}, {file_label} says {found[0]} "
            f"{list(found[1])} at bytes {found[2]}-{found[3]}")
    return entry


def validate_compressed_index(index: object, frames_end: int, label: str) -> SafetensorsHeader:
    """Validate the JSON index of a ``.safetensors.zst`` file (exporter/convert/compress.py).

    The embedded ``__safetensors_header__`` must be a valid safetensors header whose data
    section the tensors fill exactly; each tensor entry must repeat its dtype and shape, have
    ``nbytes`` equal to that size, a ``shuffle`` of 1 or its element size, and frames
    ``[offset, length, raw_length]`` that lie between the magic and the index
    (``8 <= offset``, ``offset + length <= frames_end``), do not overlap, hold at most
    :data:`MAX_FRAME_BYTES` raw bytes each, and add up to ``nbytes``.

    Returns:
        The original file's header (``data_start`` as in the original safetensors file).
    """
    if not isinstance(index, dict):
        raise ArchiveError(f"{label}: index is not a JSON object")
    original = index.get("__safetensors_header__")
    if not isinstance(original, str):
        raise ArchiveError(f"{label}: index has no __safetensors_header__")
    raw = original.encode("utf-8")
    declared = {k: v for k, v in index.items() if not k.startswith("__")}
    sizes = [v.get("nbytes") if isinstance(v, dict) else None for v in declared.values()]
    if not all(_is_int(s) and s >= 0 for s in sizes):
        raise ArchiveError(f"{label}: a tensor entry has no valid nbytes")
    entries, metadata = _parse(raw, sum(sizes), label)  # type: ignore[arg-type]
    if entries.keys() != declared.keys():
        raise ArchiveError(f"{label}: the index and its safetensors header list different tensors")
    spans: list[tuple[int, int, str]] = []
    for name, entry in entries.items():
        value = declared[name]
        if value.get("dtype") != entry.dtype or value.get("shape") != list(entry.shape):
            raise ArchiveError(f"{label}: tensor {name!r}: index and safetensors header disagree")
        if value["nbytes"] != entry.end - entry.begin:
            raise ArchiveError(f"{label}: tensor {name!r}: nbytes {value['nbytes']} for "
                               f"{entry.end - entry.begin} bytes")
        if value.get("shuffle") not in (1, ITEMSIZE[entry.dtype]):
            raise ArchiveError(f"{label}: tensor {name!r}: shuffle {_short(value.get('shuffle'))}")
        frames, total = value.get("frames"), 0
        if not isinstance(frames, list):
            raise ArchiveError(f"{label}: tensor {name!r}: frames is not a list")
        for frame in frames:
            if not (isinstance(frame, list) and len(frame) == 3 and all(map(_is_int, frame))):
                raise ArchiveError(f"{label}: tensor {name!r}: frame {_short(frame)} is not three "
                                   "integers")
            offset, length, raw_length = frame
            if not (8 <= offset and 0 <= length and offset + length <= frames_end
                    and 0 <= raw_length <= MAX_FRAME_BYTES):
                raise ArchiveError(f"{label}: tensor {name!r}: frame {frame} outside the file "
                                   "or too large")
            spans.append((offset, offset + length, name))
            total += raw_length
        if total != value["nbytes"]:
            raise ArchiveError(f"{label}: tensor {name!r}: frames hold {total} of "
                               f"{value['nbytes']} bytes")
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise ArchiveError(f"{label}: frames of tensors {first!r} and {second!r} overlap")
    return SafetensorsHeader(entries, metadata, 8 + len(raw), sum(sizes))  # type: ignore[arg-type]
