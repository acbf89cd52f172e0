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

Bounded queues between the stages keep at most a few chunks in flight. Every wait on a queue
or a thread is bounded (:data:`WAIT_S`) and checks the pipeline's events: a KeyboardInterrupt
can land inside ``queue.Queue``'s own ``Condition`` code in the caller thread and lose a
wake-up (CPython ``threading.Condition.notify`` releases a waiter, then removes it) or leave the
queue's mutex held, so a blocking ``get``/``put``/``join`` could wait forever. After an
interrupt or error in the caller thread the stages drop their work, the caller touches no queue
again, and threads that do not end within :data:`ABANDON_S` are left behind (daemons). The sha256 of every
written file is computed as it is written (:attr:`Converter.written_files`), so nothing needs
to read the output back.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.convert.engines import CastEngine, CpuCastEngine, Release
from exporter.convert.safetensors_writer import SafetensorsWriter, TensorSpec
from exporter.convert.stats import StatsAccumulator
from exporter.errors import ExporterError
from exporter.records import TensorJob, TensorStats, WrittenFile, WrittenRecord

CHUNK_BYTES = 8 << 20
QUEUE_DEPTH = 2  # chunks waiting in front of each stage
WRITEBACK_BYTES = 64 << 20  # written bytes between writeback hints
WAIT_S = 0.1  # longest single wait on a queue or thread before the events are checked again
ABANDON_S = 2.0  # after an interrupt, how long the caller waits for a thread to end


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


class _Aborted(Exception):
    """A stage failed: the caller stops feeding and re-raises the stage's error."""


_BEGIN, _END, _STOP = "begin", "end", "stop"


def _join(thread: threading.Thread, stopped: threading.Event) -> None:
    """Wait for ``thread`` in bounded steps; once ``stopped`` is set, for at most ABANDON_S."""
    deadline: float | None = None
    while thread.is_alive():
        if stopped.is_set():
            deadline = deadline if deadline is not None else time.monotonic() + ABANDON_S
            if time.monotonic() >= deadline:
                return  # a daemon thread stuck on a lost wake-up: left behind
        thread.join(WAIT_S)


class _Stage:
    """A consumer thread: ``handle(kind, index, piece)`` for each item, in order.

    ``failed``: a stage failed (the others skip their work); ``stopped``: the caller thread was
    interrupted (every thread drops its work and ends)."""

    def __init__(self, name: str, handle: Callable[[str, int, _Piece | None], None],
                 failed: threading.Event, stopped: threading.Event) -> None:
        self.queue: queue.Queue[tuple[str, int, _Piece | None]] = queue.Queue(QUEUE_DEPTH)
        self.error: BaseException | None = None
        self._handle = handle
        self._failed = failed
        self._stopped = stopped
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                kind, index, piece = self.queue.get(timeout=WAIT_S)
            except queue.Empty:
                continue
            except BaseException as exc:  # noqa: BLE001 - the queue was broken by an interrupt
                if not self._stopped.is_set():  # (its mutex released under this thread)
                    self.error = exc
                    self._failed.set()
                return
            if kind == _STOP:
                return
            try:
                if not self._failed.is_set():
                    self._handle(kind, index, piece)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller thread
                self.error = exc
                self._failed.set()
            finally:
                if piece is not None:
                    piece.done()

    def put(self, item: tuple[str, int, _Piece | None]) -> None:
        while True:
            if self._failed.is_set() or self._stopped.is_set():
                raise _Aborted
            try:
                self.queue.put(item, timeout=WAIT_S)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        """Let the thread finish its queue and end; after an interrupt, just let it end."""
        while self._thread.is_alive() and not self._stopped.is_set():
            try:
                self.queue.put((_STOP, -1, None), timeout=WAIT_S)
                break
            except queue.Full:
                continue
        _join(self._thread, self._stopped)


class _Reader:
    """Reads every job's chunks ahead of the caller in a thread of its own."""

    def __init__(self, jobs: Sequence[TensorJob], chunk_bytes: int, failed: threading.Event,
                 stopped: threading.Event):
        self.queue: queue.Queue[Any] = queue.Queue(QUEUE_DEPTH)
        self._jobs = jobs
        self._chunk_bytes = chunk_bytes
        self._failed = failed
        self._stopped = stopped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="convert-read", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not (self._stop.is_set() or self._stopped.is_set()):
            try:
                self.queue.put(item, timeout=WAIT_S)
                return True
            except queue.Full:
                continue
        return False

    def _loop(self) -> None:
        try:
            for job in self._jobs:
                for chunk in job.chunks(self._chunk_bytes):
                    if not self._put(chunk):
                        return
                if not self._put(_END):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller thread
            self._put(exc)

    def chunks(self) -> Iterator[torch.Tensor]:
        """The current job's chunks."""
        while True:
            try:
                item = self.queue.get(timeout=WAIT_S)
            except queue.Empty:
                if self._failed.is_set():
                    raise _Aborted from None
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        self._stop.set()
        _join(self._thread, self._stopped)


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
        if kind == _BEGIN:
            self._tensor_digest = hashlib.sha256()
        elif kind == _END:
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
        if kind == _BEGIN:
            self._stats = StatsAccumulator()
        elif kind == _END:
            self.stats[index] = self._stats.result()
        else:
            assert piece is not None
            self._stats.update(piece.values)

    def run(self) -> tuple[list[str], list[TensorStats]]:
        failed = threading.Event()
        stopped = threading.Event()
        writers = [
            _Stage("convert-write", self._write, failed, stopped),
            _Stage("convert-file-sha256", self._hash_file, failed, stopped),
            _Stage("convert-sha256", self._hash, failed, stopped),
        ]
        summariser = _Stage("convert-stats", self._summarise, failed, stopped)
        reader = _Reader(self.jobs, self.converter.chunk_bytes, failed, stopped)
        try:
            self._feed(reader, writers, summariser)
        except _Aborted:
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

    def _feed(self, reader: _Reader, writers: list[_Stage], summariser: _Stage) -> None:
        for index, (job, spec) in enumerate(zip(self.jobs, self.specs, strict=True)):
            engine = self.converter.engine_for(job)
            stats = StatsAccumulator()
            users = writers if engine.computes_stats else [*writers, summariser]
            for stage in users:
                stage.put((_BEGIN, index, None))
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
                stage.put((_END, index, None))


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
