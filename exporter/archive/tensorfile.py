"""Tensor files on the read side: the safetensors header parser, memory maps, raw bytes.

Every safetensors header the loader reads (a local file, or byte ranges of a Hub file) goes
through :func:`read_safetensors_header`, so a stricter validating parser replaces it in one
place. Format (safetensors ``README.md``, "Format"): 8 bytes little-endian u64 ``N``, then
``N`` bytes of UTF-8 JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets":
[begin, end]}`` (offsets relative to the byte after the header) plus an optional
``__metadata__`` map, then the data.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporter.errors import ArchiveError
from exporter.records import TORCH_DTYPES

#: the largest header accepted (safetensors' own limit, ``MAX_HEADER_SIZE``: 100 MB)
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: ``entries`` maps tensor names to their header entry; ``data_start`` is
    the file offset of the data section (8 + header length)."""

    entries: dict[str, Any]
    data_start: int

    def keys(self) -> list[str]:
        return [k for k in self.entries if k != "__metadata__"]

    def span(self, name: str) -> tuple[int, int]:
        """The data offsets ``(begin, end)`` of ``name``, relative to :attr:`data_start`."""
        entry = self.entries.get(name)
        if entry is None or name == "__metadata__":
            raise KeyError(name)
        begin, end = entry["data_offsets"]
        return int(begin), int(end)


def read_safetensors_header(read: Callable[[int, int], bytes], size: int,
                            label: str) -> SafetensorsHeader:
    """Parse the header of a safetensors file of ``size`` bytes.

    Args:
        read: ``read(offset, length)`` returns those bytes of the file (a local file, or a
            ranged request to the Hub); called twice: the length prefix, then the JSON.
        size: the file's size in bytes.
        label: how errors name the file.

    Raises:
        ArchiveError: the file is too short, or the header length or JSON is corrupt.

    Example:
        >>> import json, struct
        >>> header = json.dumps({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}})
        >>> data = struct.pack("<Q", len(header)) + header.encode() + bytes(4)
        >>> def read(offset, length):
        ...     return data[offset:offset + length]
        >>> parsed = read_safetensors_header(read, len(data), "w.safetensors")
        >>> parsed.keys(), parsed.span("w"), parsed.data_start
        (['w'], (0, 4), 69)
    """
    if size < 8:
        raise ArchiveError(f"{label}: not a safetensors file")
    (header_len,) = struct.unpack("<Q", read(0, 8))
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise ArchiveError(f"{label}: corrupt safetensors header")
    try:
        entries = json.loads(read(8, header_len))
    except ValueError as exc:
        raise ArchiveError(f"{label}: corrupt safetensors header") from exc
    if not isinstance(entries, dict):
        raise ArchiveError(f"{label}: corrupt safetensors header")
    return SafetensorsHeader(entries, 8 + header_len)


def tensor_from_bytes(data: bytearray | memoryview, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """A tensor viewing ``data`` (no copy), with a safetensors or torch dtype name.

    Example:
        >>> tensor_from_bytes(bytearray(b"\\x00\\x3c\\x00\\x40"), "F16", [2])
        tensor([1., 2.], dtype=torch.float16)
    """
    torch_dtype = TORCH_DTYPES[dtype] if dtype in TORCH_DTYPES else getattr(torch, dtype)
    if len(data) == 0:
        return torch.empty(list(shape), dtype=torch_dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(torch_dtype).reshape(list(shape))


class SafetensorsMap:
    """A safetensors file mapped into memory; tensors are zero-copy views of the mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size

            def read(offset: int, length: int) -> bytes:
                fh.seek(offset)
                return fh.read(length)

            self.parsed = read_safetensors_header(read, size, str(path))
            self.header: dict[str, Any] = self.parsed.entries
            self._start = self.parsed.data_start
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > self._start else None

    def keys(self) -> list[str]:
        return self.parsed.keys()

    def get(self, name: str) -> torch.Tensor:
        begin, end = self.parsed.span(name)
        entry = self.header[name]
        if end == begin:
            return tensor_from_bytes(bytearray(), entry["dtype"], entry["shape"])
        assert self._map is not None
        view = memoryview(self._map)[self._start + begin:self._start + end]
        return tensor_from_bytes(view, entry["dtype"], entry["shape"])


class CompressedTensors:
    """A ``.safetensors.zst`` file (``--compress zstd``): tensors are decompressed on read, not
    memory-mapped (still no pickle)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, name: str) -> torch.Tensor:
        from exporter.convert.compress import read_compressed_tensor

        return read_compressed_tensor(self.path, name)
