"""Tensor files on the read side: memory maps of validated files, raw bytes as tensors.

Every safetensors header the loader reads goes through
:func:`exporter.archive.header.read_safetensors_header`, which validates it whole before a
byte is mapped. Format (safetensors ``README.md``, "Format"): 8 bytes little-endian u64 ``N``, then
``N`` bytes of UTF-8 JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets":
[begin, end]}`` (offsets relative to the byte after the header) plus an optional
``__metadata__`` map, then the data.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path

import torch

from exporter.archive.header import SafetensorsHeader, read_safetensors_header
from exporter.records import TORCH_DTYPES


def tensor_from_bytes(data: bytearray | memoryview, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """A tensor viewing ``data`` (no copy), with a safetensors or torch dtype name.

    Example:
        >>> tensor_from_bytes(bytearray(b"\\x00\\x3c\\x00\\x40"), "F16", [2])
        tensor([1., 2.], dtype=torch.float16)
    """
    torch_dtype = TORCH_DTYPES[dtype].torch if dtype in TORCH_DTYPES else getattr(torch, dtype)
    if len(data) == 0:
        return torch.empty(list(shape), dtype=torch_dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(torch_dtype).reshape(list(shape))


class SafetensorsMap:
    """A safetensors file mapped into memory; tensors are zero-copy views of the mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            # Validated whole before a byte is mapped (exporter/archive/header.py).
            self.header: SafetensorsHeader = read_safetensors_header(fh, str(path))
            self._start = self.header.data_start
            self._map = (mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                         if self.header.data_size else None)

    def keys(self) -> list[str]:
        return list(self.header.entries)

    def get(self, name: str) -> torch.Tensor:
        entry = self.header.entries[name]
        if entry.end == entry.begin:
            return tensor_from_bytes(bytearray(), entry.dtype, entry.shape)
        assert self._map is not None
        view = memoryview(self._map)[self._start + entry.begin:self._start + entry.end]
        return tensor_from_bytes(view, entry.dtype, entry.shape)


class CompressedTensors:
    """A ``.safetensors.zst`` file (``--compress zstd``): tensors are decompressed on read, not
    memory-mapped (still no pickle); its index is validated like a header."""

    def __init__(self, path: Path) -> None:
        from exporter.convert.compress import read_compressed_header

        self.path = path
        self.header: SafetensorsHeader = read_compressed_header(path)

    def get(self, name: str) -> torch.Tensor:
        from exporter.convert.compress import read_compressed_tensor

        return read_compressed_tensor(self.path, name)
