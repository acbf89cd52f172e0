"""Stream tensors into safetensors files: read chunk -> cast -> statistics + sha256 -> write.

Each output tensor is a :class:`TensorJob` that knows its shape and dtype up front and
yields its elements as 1-D chunks in row-major order. Memory is bounded by a few chunks,
whether a tensor is read straight from a file, from ZeRO partition slices, or merged from
tensor-parallel shards (:func:`exporter.neox.model.merged_chunks`).

:meth:`Converter.write_file` runs the stages of one file as a pipeline of threads, so reading,
casting, statistics and hashing overlap (``os.pread``, torch casts, numpy reductions, hashlib
and file writes all release the GIL on large buffers)::

    reader thread ──chunks──> caller thread: cast (CPU, or GPU via exporter.convert.device)
                                  │ one output piece, shared by
           ┌──────────────┬───────┴───────┬─────────────────┐
      statistics     tensor sha256    file sha256     writer (page-cache writeback hints)

Bounded queues between the stages keep at most a few chunks in flight; every wait on them is
bounded, so Ctrl-C ends a write within seconds (:mod:`exporter.convert.stages`). The sha256 of every
written file is computed as it is written (:attr:`Converter.written_files`), so nothing needs
to read the output back.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.convert.engines import CastEngine, CpuCastEngine, Release
from exporter.convert.safetensors_writer import SafetensorsWriter, TensorSpec
from exporter.convert.stages import BEGIN, END, Aborted, Reader, Stage
from exporter.convert.stats import StatsAccumulator
from exporter.errors import ExporterError
from exporter.records import TensorJob, TensorStats, WrittenFile, WrittenRecord

CHUNK_BYTES = 8 << 20
WRITEBACK_BYTES = 64 << 20  # written bytes between writeback hints


@dataclass
class Converter:
    """Casting and statistics settings shared by every file of an export.

    Attributes:
        dtype: output dtype for floating tensors of kind ``model`` (None keeps the source's).
        device: ``cpu``, ``cuda`` (or ``cuda:N``), or ``auto`` (CUDA when available): where
            casts and statistics run.
        chunk_bytes: read size.
        progress: called with the number of source bytes processed, as they are.
        written_files: every file written so far, with its size and sha256.
    """

    dtype: torch.dtype | None = None
    device: str = "cpu"
    chunk_bytes: int = CHUNK_BYTES
    progress: Callable[[int], None] | None = field(default=None, repr=False)
    written_files: list[WrittenFile] = field(default_factory=list, repr=False)
    _engines: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ExporterError(f"unknown device {self.device!r} (cpu, cuda, cuda:N or auto)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ExporterError(f"device {self.device!r} requested but no CUDA device is available")
        if self.chunk_bytes < 1:
            raise ValueError(f"Converter.chunk_bytes must be positive, got {self.chunk_bytes}")

    def output_dtype(self, job: TensorJob) -> torch.dtype:
        if self.dtype is not None and job.kind == "model" and job.dtype.is_floating_point:
            return self.dtype
        return job.dtype

    def engine_for(self, job: TensorJob) -> CastEngine:
        """The engine that casts ``job``: the GPU for floating tensors of 1 MiB or more (or one
        chunk, if smaller) when a CUDA device is selected, since small ones are not worth the
        transfers; else the CPU."""
        if self.device != "cpu" and job.dtype.is_floating_point:
            if job.numel * job.dtype.itemsize >= min(self.chunk_bytes, 1 << 20):
                if "device" not in self._engines:
                    from exporter.convert.device import DeviceCastEngine

                    self._engines["device"] = DeviceCastEngine(self.device, self.chunk_bytes)
                return self._engines["device"]
        if "cpu" not in self._engines:
            self._engines["cpu"] = CpuCastEngine()
        return self._engines["cpu"]

    def write_file(
        self,
        path: Path,
        jobs: Sequence[TensorJob],
        root: Path,
        metadata: dict[str, str] | None = None,
    ) -> list[WrittenRecord]:
        """Write ``jobs`` into the safetensors file ``path``; ``root`` makes the recorded path
        relative. The file's size and sha256 are appended to :attr:`written_files`."""
        specs = [TensorSpec(j.name, self.output_dtype(j), j.shape) for j in jobs]
        rel = str(Path(path).relative_to(root)) if root else str(path)
        with _Writer(Path(path), specs, metadata or {"format": "pt"}) as writer:
            pipeline = _Pipeline(self, jobs, specs, writer)
            digests, stats = pipeline.run()
        placed = {p.name: p for p in writer.placed}
        records = [
            WrittenRecord(
                job, rel, spec.dtype, placed[job.name].begin, placed[job.name].end,
                digests[i], stats[i],
            )
            for i, (job, spec) in enumerate(zip(jobs, specs, strict=True))
        ]
        self.written_files.append(WrittenFile(rel, writer.total_bytes, pipeline.file_sha256))
        return records


class _Writer(SafetensorsWriter):
    """A :class:`SafetensorsWriter` that starts writing its pages back to disk as it goes.

    Linux starts writeback of a range's dirty pages on ``POSIX_FADV_DONTNEED``
    (``mm/fadvise.c`` ``generic_fadvise`` -> ``__filemap_fdatawrite_range``, without waiting),
    and drops them from the page cache once clean: the writer's final ``fsync`` then finds
    little left to flush, an export of hundreds of GB does not crowd the page cache, and
    (measured) page-cache writes cost less CPU when memory is not full of dirty pages.
    """

    def __enter__(self) -> _Writer:
        super().__enter__()
        self._advised = 0
        return self

    @property
    def header(self) -> bytes:
        """The bytes in front of the tensor data (length prefix and JSON header)."""
        return self._header

    def write(self, name: str, data: bytes | memoryview | bytearray) -> None:
        super().write(name, data)
        fh = self._fh
        if fh is not None and hasattr(os, "posix_fadvise"):
            end = fh.tell()
            if end - self._advised >= WRITEBACK_BYTES:
                fh.flush()
                os.posix_fadvise(fh.fileno(), self._advised, end - self._advised,
                                 os.POSIX_FADV_DONTNEED)
                self._advised = end


class _Piece:
    """One output chunk shared by several stages; its buffer is released when all are done."""

    __slots__ = ("values", "data", "_release", "_pending", "_lock")

    def __init__(self, values: torch.Tensor, release: Release | None, users: int) -> None:
        self.values = values
        self.data = _bytes_of(values)
        self._release = release
        self._pending = users
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last and self._release is not None:
            self._release()


class _Pipeline:
    """The threads of one :meth:`Converter.write_file` call."""

    def __init__(self, converter: Converter, jobs: Sequence[TensorJob],
                 specs: Sequence[TensorSpec], writer: _Writer) -> None:
        self.converter = converter
        self.jobs = jobs
        self.specs = specs
        self.writer = writer
        self.digests: list[str] = [""] * len(jobs)
        self.stats: list[TensorStats | None] = [None] * len(jobs)
        self._tensor_digest = hashlib.sha256()
        self._file_digest = hashlib.sha256(writer.header)
        self._stats = StatsAccumulator()

    @property
    def file_sha256(self) -> str:
        return self._file_digest.hexdigest()

    def _hash(self, kind: str, index: int, piece: _Piece | None) -> None:
        if kind == BEGIN:
            self._tensor_digest = hashlib.sha256()
        elif kind == END:
            self.digests[index] = self._tensor_digest.hexdigest()
        else:
            assert piece is not None
            self._tensor_digest.update(piece.data)

    def _write(self, kind: str, index: int, piece: _Piece | None) -> None:
        if piece is not None:
            self.writer.write(self.jobs[index].name, piece.data)

    def _hash_file(self, kind: str, index: int, piece: _Piece | None) -> None:
        if piece is not None:
            self._file_digest.update(piece.data)

    def _summarise(self, kind: str, index: int, piece: _Piece | None) -> None:
        if kind == BEGIN:
            self._stats = StatsAccumulator()
        elif kind == END:
            self.stats[index] = self._stats.result()
        else:
            assert piece is not None
            self._stats.update(piece.values)

    def run(self) -> tuple[list[str], list[TensorStats]]:
        failed = threading.Event()
        stopped = threading.Event()
        writers = [
            Stage("convert-write", self._write, failed, stopped),
            Stage("convert-file-sha256", self._hash_file, failed, stopped),
            Stage("convert-sha256", self._hash, failed, stopped),
        ]
        summariser = Stage("convert-stats", self._summarise, failed, stopped)
        reader = Reader(self.jobs, self.converter.chunk_bytes, failed, stopped)
        try:
            self._feed(reader, writers, summariser)
        except Aborted:
            pass
        except BaseException:
            # KeyboardInterrupt (or an error) in this thread: the file is abandoned, so the
            # threads drop their work, and no queue is touched again (see the module docstring).
            stopped.set()
            raise
        finally:
            try:
                reader.stop()
                for stage in (*writers, summariser):
                    stage.stop()
            except BaseException:
                stopped.set()  # interrupted while waiting for the threads: stop waiting
                raise
        for stage in (*writers, summariser):
            if stage.error is not None:
                raise stage.error
        stats = [s for s in self.stats if s is not None]
        if len(stats) != len(self.jobs):
            raise ExporterError("conversion pipeline finished without every tensor's statistics")
        return self.digests, stats

    def _feed(self, reader: Reader, writers: list[Stage], summariser: Stage) -> None:
        for index, (job, spec) in enumerate(zip(self.jobs, self.specs, strict=True)):
            engine = self.converter.engine_for(job)
            stats = StatsAccumulator()
            users = writers if engine.computes_stats else [*writers, summariser]
            for stage in users:
                stage.put((BEGIN, index, None))
            source = _Counted(reader.chunks(), self.converter.progress)
            for values, release in engine.cast(source, spec.dtype, stats):
                piece = _Piece(values, release, len(users))
                for stage in users:
                    stage.put(("piece", index, piece))
            if source.elements != job.numel:
                raise ExporterError(
                    f"{job.name}: source yielded {source.elements} elements, shape {job.shape} "
                    f"needs {job.numel}"
                )
            if engine.computes_stats:
                self.stats[index] = stats.result()
            for stage in users:
                stage.put((END, index, None))


class _Counted:
    """Passes chunks through, counting elements and reporting source bytes to ``progress``."""

    def __init__(self, chunks: Iterator[torch.Tensor], progress: Callable[[int], None] | None):
        self.elements = 0
        self._chunks = chunks
        self._progress = progress

    def __iter__(self) -> Iterator[torch.Tensor]:
        for chunk in self._chunks:
            self.elements += chunk.numel()
            yield chunk
            if self._progress is not None:
                self._progress(chunk.numel() * chunk.element_size())


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    host = tensor.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    return memoryview(host.contiguous().view(torch.uint8).numpy()).cast("B")
