"""Byte-shuffled zstd tensor files: smaller than safetensors, still read one tensor at a time.

Float bytes compress poorly as they lie: the sign and exponent byte of each value sits among
mantissa bytes that are close to random. Grouping the bytes of equal significance first (the
byte shuffle of blosc, ``blosc/shuffle-generic.h``) turns the exponent bytes into long runs of
a few symbols that zstd's entropy coder packs tightly, while the low mantissa bytes stay
incompressible. Each tensor is cut into frames of at most ``frame_bytes`` raw bytes, shuffled
and compressed independently, so reading one tensor (or a part of it) never decompresses
another, and memory stays at one frame whatever the tensor's size.

File format (``.safetensors.zst``; no pickle, all integers little-endian)::

    8 bytes   magic  b"NEOXZST\x01" (the last byte is the format version)
    frames    zstd frames back to back (each with zstd's content checksum)
    N bytes   JSON index (UTF-8)
    8 bytes   u64    N
    8 bytes   the magic again

The index sits at the end, as in zip and Parquet, so the file is written in one pass (frame
sizes are known only once compressed); a reader takes the last 16 bytes, then the index, then
the frames of the tensors it wants. The index maps each tensor name to ``{"dtype", "shape",
"nbytes", "shuffle", "frames"}``: ``dtype`` and ``shape`` as in safetensors, ``nbytes`` the raw
size, ``shuffle`` the element size the bytes were grouped by (1: not shuffled), and ``frames``
a list of ``[offset, compressed_length, raw_length]`` with absolute file offsets. Three
reserved keys: ``__codec__`` (``{"name": "zstd", "level": L, "shuffle": "byte"}``),
``__metadata__`` (the source file's string metadata) and ``__safetensors_header__`` (the source
file's header verbatim, so :func:`decompress_safetensors` rebuilds it byte for byte and its
sha256 can be checked against the index).
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from exporter.archive.header import SafetensorsHeader, validate_compressed_index
from exporter.errors import ArchiveError, ExporterError
from exporter.files import atomic_open
from exporter.records import TORCH_DTYPES

MAGIC = b"NEOXZST\x01"
DEFAULT_LEVEL = 3
FRAME_BYTES = 32 << 20
_RESERVED = ("__codec__", "__metadata__", "__safetensors_header__")
_MAX_INDEX = 100 << 20


def parse_compression(spec: str) -> int:
    """The zstd level of a ``--compress`` value: ``zstd`` (level 3) or ``zstd:LEVEL``.

    Example:
        >>> parse_compression("zstd"), parse_compression("zstd:9")
        (3, 9)
    """
    name, _, level = spec.partition(":")
    if name.strip().lower() != "zstd":
        raise ExporterError(f"unknown compression {spec!r} (use zstd or zstd:LEVEL)")
    if not level:
        return DEFAULT_LEVEL
    try:
        value = int(level)
    except ValueError:
        raise ExporterError(f"compression level must be an integer, got {level!r}") from None
    if not 1 <= value <= zstandard.MAX_COMPRESSION_LEVEL:
        raise ExporterError(
            f"zstd level must be between 1 and {zstandard.MAX_COMPRESSION_LEVEL}, got {value}"
        )
    return value


def shuffle_bytes(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """Group the bytes of ``itemsize``-byte elements by significance: all first bytes, then all
    second bytes, ... (a uint8 array whose size is a multiple of ``itemsize``)."""
    if itemsize == 1:
        return raw
    rows = raw.reshape(-1, itemsize)
    out = np.empty((itemsize, rows.shape[0]), dtype=np.uint8)
    for plane in range(itemsize):
        out[plane] = rows[:, plane]
    return out.reshape(-1)


def unshuffle_bytes(shuffled: np.ndarray, itemsize: int, out: np.ndarray) -> None:
    """Undo :func:`shuffle_bytes` into ``out`` (a writable uint8 array of the same size)."""
    if itemsize == 1:
        out[:] = shuffled
        return
    planes = shuffled.reshape(itemsize, -1)
    rows = out.reshape(-1, itemsize)
    for plane in range(itemsize):
        rows[:, plane] = planes[plane]


@dataclass(frozen=True)
class CompressionReport:
    """What :func:`compress_safetensors` did."""

    tensors: int
    raw_bytes: int
    compressed_bytes: int
    seconds: float

    @property
    def ratio(self) -> float:
        """Compressed size over raw size (lower is better)."""
        return self.compressed_bytes / self.raw_bytes if self.raw_bytes else 1.0


def compress_safetensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    level: int = DEFAULT_LEVEL,
    *,
    frame_bytes: int = FRAME_BYTES,
    threads: int = 0,
) -> CompressionReport:
    """Write the safetensors file ``src`` as a byte-shuffled zstd file ``dst``.

    Args:
        src: a safetensors file (read frame by frame, never whole).
        dst: the file to write (under a temporary name, renamed when complete).
        level: zstd level, 1-22.
        frame_bytes: raw bytes per frame (rounded down to whole elements).
        threads: zstd worker threads per frame (0: compress on the calling thread).

    Returns:
        Tensor count, raw and compressed sizes, seconds.

    Example:
        >>> import tempfile
        >>> import torch
        >>> from safetensors.torch import save_file
        >>> folder = Path(tempfile.mkdtemp())
        >>> save_file({"w": torch.ones(4, 4)}, str(folder / "w.safetensors"))
        >>> compress_safetensors(folder / "w.safetensors", folder / "w.safetensors.zst").tensors
        1
        >>> read_compressed_tensor(folder / "w.safetensors.zst", "w").sum().item()
        16.0
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    source_header = _read_safetensors_header(src)
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=threads)
    index: dict[str, Any] = {
        "__codec__": {"name": "zstd", "level": level, "shuffle": "byte"},
        "__metadata__": source_header.metadata,
        "__safetensors_header__": source_header.text,
    }
    with open(src, "rb") as source, atomic_open(dst) as out:
        out.write(MAGIC)
        for name, entry in source_header.entries.items():
            itemsize = _itemsize(src, name, entry)
            begin, end = entry["data_offsets"]
            step = max(itemsize, frame_bytes // itemsize * itemsize)
            frames = []
            for pos in range(begin, end, step):
                size = min(step, end - pos)
                raw = os.pread(source.fileno(), size, source_header.data_start + pos)
                if len(raw) != size:
                    raise ArchiveError(f"{src}: short read in tensor {name!r}")
                shuffled = shuffle_bytes(np.frombuffer(raw, dtype=np.uint8), itemsize)
                packed = compressor.compress(shuffled.data)
                frames.append([out.tell(), len(packed), size])
                out.write(packed)
            index[name] = {
                "dtype": entry["dtype"],
                "shape": entry["shape"],
                "nbytes": end - begin,
                "shuffle": itemsize,
                "frames": frames,
            }
        encoded = json.dumps(index, separators=(",", ":")).encode("utf-8")
        out.write(encoded + struct.pack("<Q", len(encoded)) + MAGIC)
    raw_total = sum(e["data_offsets"][1] - e["data_offsets"][0]
                    for e in source_header.entries.values())
    return CompressionReport(len(source_header.entries), raw_total, dst.stat().st_size,
                             time.perf_counter() - start)


def read_compressed_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON index of a compressed tensor file (tensor entries and reserved keys)."""
    return _read_index(Path(path))


def read_compressed_tensor(path: str | os.PathLike[str], name: str) -> Any:
    """Tensor ``name`` of the compressed file ``path``, decompressing only its frames.

    Raises:
        ArchiveError: the file is not a compressed tensor file, is damaged, or lacks ``name``.
    """
    path = Path(path)
    entry = _read_index(path).get(name)
    if name in _RESERVED or not isinstance(entry, dict):
        raise ArchiveError(f"{path}: no tensor {name!r}")
    dtype = TORCH_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ArchiveError(f"{path}: tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
    import torch

    out = _allocate(path, name, tuple(entry["shape"]), dtype.torch, entry["nbytes"])
    if out.numel() * out.element_size() != entry["nbytes"]:
        raise ArchiveError(f"{path}: tensor {name!r}: size does not match its shape")
    if out.numel():
        target = out.reshape(-1).view(torch.uint8).numpy()
        with open(path, "rb") as fh:
            for begin, raw in _frames(path, fh, name, entry):
                target[begin : begin + raw.size] = raw
    return out


def _allocate(path: Path, name: str, shape: tuple[int, ...], dtype: Any, nbytes: int) -> Any:
    """Memory for a decompressed tensor, refused when it could never fit.

    A few bytes of zstd frames can stand for gigabytes (all-zero moments compress about
    30,000 to 1), so the size the index declares is checked against the machine's physical
    memory before anything is allocated, and an allocation the system refuses is an
    ArchiveError too, not an out-of-memory crash.
    """
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > physical:
        raise ArchiveError(f"{path}: tensor {name!r} needs {nbytes} bytes of memory, more than "
                           f"this machine has ({physical})")
    import torch

    try:
        return torch.empty(shape, dtype=dtype)
    except (RuntimeError, MemoryError) as exc:
        raise ArchiveError(f"{path}: tensor {name!r}: cannot allocate {nbytes} bytes") from exc


def decompress_safetensors(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rebuild the original safetensors file from a compressed one, byte for byte, one frame
    at a time."""
    src, dst = Path(src), Path(dst)
    index = _read_index(src)
    original = index["__safetensors_header__"].encode("utf-8")
    entries = {k: v for k, v in json.loads(original).items() if k != "__metadata__"}
    with open(src, "rb") as fh, atomic_open(dst) as out:
        out.write(struct.pack("<Q", len(original)) + original)
        for name in sorted(entries, key=lambda n: entries[n]["data_offsets"][0]):
            if not isinstance(index.get(name), dict):
                raise ArchiveError(f"{src}: no frames for tensor {name!r}")
            for _, raw in _frames(src, fh, name, index[name]):
                out.write(raw.data)


def _frames(path: Path, fh: Any, name: str, entry: dict[str, Any]) -> Any:
    """Yield ``(raw offset, unshuffled bytes)`` for each frame of tensor ``name``."""
    decompressor = zstandard.ZstdDecompressor()
    pos = 0
    for offset, length, raw_length in entry["frames"]:
        packed = os.pread(fh.fileno(), length, offset)
        if len(packed) != length or pos + raw_length > entry["nbytes"]:
            raise ArchiveError(f"{path}: tensor {name!r}: frame outside the file or tensor")
        try:
            raw = decompressor.decompress(packed, max_output_size=raw_length)
        except zstandard.ZstdError as exc:
            raise ArchiveError(f"{path}: tensor {name!r}: damaged frame: {exc}") from exc
        if len(raw) != raw_length:
            raise ArchiveError(f"{path}: tensor {name!r}: frame has the wrong length")
        plain = np.empty(raw_length, dtype=np.uint8)
        unshuffle_bytes(np.frombuffer(raw, dtype=np.uint8), entry["shuffle"], plain)
        yield pos, plain
        pos += raw_length
    if pos != entry["nbytes"]:
        raise ArchiveError(f"{path}: tensor {name!r}: frames hold {pos} of {entry['nbytes']} bytes")


def _itemsize(path: Path, name: str, entry: dict[str, Any]) -> int:
    dtype = TORCH_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ArchiveError(f"{path}: tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
    return dtype.itemsize


@dataclass(frozen=True)
class _SourceHeader:
    text: str
    entries: dict[str, Any]  # tensor entries, in data order
    metadata: dict[str, str]
    data_start: int


def _read_safetensors_header(path: Path) -> _SourceHeader:
    """Layout: safetensors ``docs/source/index.mdx`` "Format" (u64 length, JSON, data)."""
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise ArchiveError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_INDEX:
            raise ArchiveError(f"{path}: not a safetensors file (header of {length} bytes)")
        raw = fh.read(length)
    try:
        text = raw.decode("utf-8")
        parsed = json.loads(text)
    except ValueError as exc:
        raise ArchiveError(f"{path}: unreadable safetensors header: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ArchiveError(f"{path}: safetensors header is not an object")
    metadata = parsed.pop("__metadata__", None) or {}
    for name, entry in parsed.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise ArchiveError(f"{path}: tensor {name!r} has no valid data_offsets")
    ordered = dict(sorted(parsed.items(), key=lambda kv: kv[1]["data_offsets"][0]))
    expected = 0
    for name, entry in ordered.items():
        begin, end = entry["data_offsets"]
        if begin != expected or end < begin:
            raise ArchiveError(f"{path}: tensor {name!r} does not follow the previous one")
        expected = end
    return _SourceHeader(text, ordered, metadata, 8 + length)


def read_compressed_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """The original safetensors header of a compressed file, validated with its index."""
    return _read_validated(Path(path))[1]


def _read_index(path: Path) -> dict[str, Any]:
    return _read_validated(path)[0]


def _read_validated(path: Path) -> tuple[dict[str, Any], SafetensorsHeader]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        fh.seek(max(0, size - 16))
        tail = fh.read(16)
        if head != MAGIC or len(tail) != 16 or tail[8:] != MAGIC:
            raise ArchiveError(f"{path}: not a compressed tensor file (bad magic or truncated)")
        (length,) = struct.unpack("<Q", tail[:8])
        if length > min(_MAX_INDEX, size - 24):
            raise ArchiveError(f"{path}: index of {length} bytes does not fit the file")
        fh.seek(size - 16 - length)
        text = fh.read(length)
    try:
        index = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"{path}: unreadable index: {exc}") from exc
    codec = index.get("__codec__") if isinstance(index, dict) else None
    if not isinstance(codec, dict) or codec.get("name") != "zstd":
        raise ArchiveError(f"{path}: unknown codec")
    return index, validate_compressed_index(index, size - 16 - length, str(path))
