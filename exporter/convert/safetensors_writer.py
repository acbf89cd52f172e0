"""A streaming safetensors writer: header first, then one tensor at a time.

Why not ``safetensors.torch.save_file``: it needs every tensor in memory at once, and an
export holds hundreds of GB. The format is simple enough to stream (safetensors
``docs/source/index.mdx``, "Format"): an 8-byte little-endian header length, a JSON header
mapping each name to ``dtype``, ``shape`` and ``data_offsets`` (relative to the end of the
header), padded with spaces to a multiple of 8, then the tensors' bytes back to back. Shapes
and dtypes are known from the source pickles before any data is read, so the header can be
written first and the data appended as it is produced. The file is written under a temporary
name and renamed into place only when every tensor was written in full.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from exporter.dtypes import DType, as_dtype
from exporter.errors import ExporterError
from exporter.files import temp_name
from exporter.records import SAFETENSORS_DTYPES, element_size


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's entry in a safetensors header."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"TensorSpec.name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        if self.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"TensorSpec.dtype {self.dtype} has no safetensors equivalent")
        if any(not isinstance(n, int) or n < 0 for n in self.shape):
            raise ValueError(f"TensorSpec.shape must be non-negative ints, got {self.shape!r}")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


@dataclass
class WrittenTensor:
    """Where a tensor's bytes ended up: absolute byte range in the file."""

    name: str
    begin: int
    end: int


@dataclass
class SafetensorsWriter:
    """Writes ``specs`` in order; call :meth:`write` with each tensor's bytes, in order.

    Example:
        >>> specs = [TensorSpec("w", float32, (2, 2))]              # exporter.dtypes
        >>> with SafetensorsWriter(path, specs) as writer:           # doctest: +SKIP
        ...     writer.write("w", numpy.ones(4, dtype=numpy.float32).tobytes())
    """

    path: Path
    specs: list[TensorSpec]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("SafetensorsWriter.specs holds a name twice")
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in self.metadata.items()}
        offset = 0
        for spec in self.specs:
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self._header = struct.pack("<Q", len(encoded)) + encoded
        self.data_start = len(self._header)
        self.total_bytes = self.data_start + offset
        self._index = 0
        self._written = 0
        self._fh: Any = None
        self._tmp = temp_name(self.path)
        self.placed: list[WrittenTensor] = []

    def __enter__(self) -> SafetensorsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self._open_file(self._tmp)
        self._fh.write(self._header)
        self._skip_empty()
        return self

    def _open_file(self, path: Path) -> Any:
        """The file object the bytes go to (``write``, ``tell``, ``flush``, ``fileno``,
        ``close``)."""
        return open(path, "wb")  # noqa: SIM115 - closed in __exit__

    def _skip_empty(self) -> None:
        # Zero-element tensors get no write() call: record them as they come up.
        assert self._fh is not None
        while self._index < len(self.specs) and self.specs[self._index].nbytes == 0:
            pos = self._fh.tell()
            self.placed.append(WrittenTensor(self.specs[self._index].name, pos, pos))
            self._index += 1

    def write(self, name: str, data: bytes | memoryview | bytearray) -> None:
        """Append bytes of tensor ``name`` (the current one); may be called per chunk."""
        if self._fh is None:
            raise ExporterError("SafetensorsWriter.write outside its 'with' block")
        if self._index >= len(self.specs) or self.specs[self._index].name != name:
            expected = self.specs[self._index].name if self._index < len(self.specs) else None
            raise ExporterError(f"safetensors writer expected tensor {expected!r}, got {name!r}")
        spec = self.specs[self._index]
        size = memoryview(data).nbytes
        if self._written + size > spec.nbytes:
            raise ExporterError(f"tensor {name!r}: more bytes than its shape {spec.shape} holds")
        self._fh.write(data)
        self._written += size
        if self._written == spec.nbytes:
            begin = self._fh.tell() - spec.nbytes
            self.placed.append(WrittenTensor(name, begin, begin + spec.nbytes))
            self._index += 1
            self._written = 0
            self._skip_empty()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._fh is not None
        complete = False
        try:
            if exc_type is None and self._index != len(self.specs):
                missing = self.specs[self._index].name
                raise ExporterError(f"{self.path}: tensor {missing!r} was never written in full")
            if exc_type is None:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                complete = True
        finally:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except BaseException:
                complete = False
                raise
            finally:
                # Renamed into place only once every byte is on disk and the file closed: a
                # flush, fsync or close that fails (a full disk) leaves nothing under the name.
                if complete:
                    os.replace(self._tmp, self.path)
                else:
                    self._tmp.unlink(missing_ok=True)
