"""Stream tensors into safetensors files: read chunk -> cast -> write, digests, statistics.

Each output tensor is a :class:`TensorJob` that knows its shape and dtype up front and
yields its elements as 1-D chunks in row-major order. Memory is bounded by a few chunks,
whether a tensor is read straight from a file, from ZeRO partition slices, or merged from
tensor-parallel shards (:func:`exporter.neox.model.merged_chunks`).

One pass over each byte, in one thread per file: a chunk is read (one copy out of the page
cache: straight into the aligned buffer that goes to disk around the page cache,
:mod:`exporter.convert.direct`, when the tensor is not cast and its source can,
:func:`exporter.records.reads_into`; else into a new buffer), cast (CPU, or GPU via
:mod:`exporter.convert.device`), written (copied into that aligned buffer, unless it is there),
and while it is still in the CPU's cache hashed for its file (sha256, the Hub's LFS id, kept in
:attr:`Converter.written_files` so nothing reads the output back), hashed for its tensor
(BLAKE3, :mod:`exporter.convert.digest`) and summarised (:mod:`exporter.convert.stats`, or
skipped with ``statistics=False``). Chunks are 4 MiB: each costs some Python around the
passes, whose threads then queue for the GIL, and the statistics' dot products run on longer
rows. Measured on the 2-core machine with chunks read into place, six runs of each size in
rotating order, whole process: the 2.15 GB export of ``benchmarks/RESULTS.md`` took 4.37-5.24
s (median 4.5) with 4 MiB chunks, 4.28-4.97 (4.77) with 2 MiB and 4.81-5.42 (5.0) with 1 MiB;
in-process, eight runs each, 2.66-3.42 s against 3.04-3.65 with 1 MiB.

Threads and why (:meth:`Converter.write_files`): the large files of a step (model, master,
exp_avg, exp_avg_sq) are independent, so each is written by a thread of its own, ``workers``
at a time (file I/O, hashlib, blake3, numpy reductions and torch casts release the GIL).
Measured on the 2-core machine, side by side, writing the 2.2 GB checkpoint of
``benchmarks/RESULTS.md`` after planning: 4.4 s with two file threads against 6.9-8.6 s with
one, for the same CPU time. At least :data:`FILES_AT_ONCE`, whatever the cores: with two
threads for the three optimizer files, the third was written alone once the first two were
done, one core idle (the export of that checkpoint in-process: 2.36-2.51 s with two, 2.10-2.19
with three or four; its many-interval twin 5.10-5.29 s and 4.84-4.89). The design before ran
each stage of a file in a thread of its own with queues between them: 46,727 futex calls per export and 9.0-9.3 CPU s on a quiet machine
(issue 14); this design took 6.1-9.3 CPU s on a loaded one.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.convert.digest import TENSOR_DIGEST, Hasher, new_hasher
from exporter.convert.direct import DirectFile
from exporter.convert.engines import CastEngine, CpuCastEngine
from exporter.convert.gpu import cuda_available
from exporter.convert.safetensors_writer import SafetensorsWriter, TensorSpec
from exporter.convert.stats import StatsAccumulator
from exporter.dtypes import DType, as_dtype, from_torch
from exporter.errors import ExporterError
from exporter.records import (
    NO_STATS,
    TensorJob,
    TensorStats,
    WrittenFile,
    WrittenRecord,
    takes_place,
)

#: Files :meth:`Converter.write_files` writes at once at least: a step's large files (model,
#: master, exp_avg, exp_avg_sq), so that none is left to be written alone.
FILES_AT_ONCE = 4
CHUNK_BYTES = 4 << 20  # read size on the CPU (module docstring: why this size)
DEVICE_CHUNK_BYTES = 8 << 20  # read size when a GPU casts: larger transfers
WRITEBACK_BYTES = 64 << 20  # written bytes between writeback hints


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's cpuset, ``taskset``,
    a scheduler's pinning), not every core of the machine as ``os.cpu_count`` says."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


@dataclass(frozen=True)
class FileTask:
    """One safetensors file to write: where, which tensors, and its header metadata."""

    path: Path
    jobs: Sequence[TensorJob]
    metadata: dict[str, str] | None = None


@dataclass
class Converter:
    """Casting and statistics settings shared by every file of an export.

    Attributes:
        dtype: output dtype for floating tensors of kind ``model`` (None keeps the source's).
        device: ``cpu``, ``cuda`` (or ``cuda:N``), or ``auto`` (CUDA when available): where
            casts and statistics run.
        chunk_bytes: read size (default: 4 MiB on the CPU, 8 MiB with a GPU).
        statistics: compute each tensor's statistics (False leaves them null in the index).
        workers: files written at once by :meth:`write_files` (default: one per core this
            process may run on, :func:`available_cores`, and at least :data:`FILES_AT_ONCE`).
        direct_io: write around the page cache (``O_DIRECT``) where the file system allows.
        progress: called with the number of source bytes processed, as they are (from the
            writing threads, one call at a time).
        written_files: every file written so far, with its size and sha256.
    """

    dtype: DType | None = None
    device: str = "cpu"
    chunk_bytes: int | None = None
    statistics: bool = True
    workers: int | None = None
    direct_io: bool = True
    progress: Callable[[int], None] | None = field(default=None, repr=False)
    written_files: list[WrittenFile] = field(default_factory=list, repr=False)
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dtype is not None:
            self.dtype = as_dtype(self.dtype)
        if self.device == "auto":
            self.device = "cuda" if cuda_available() else "cpu"
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ExporterError(f"unknown device {self.device!r} (cpu, cuda, cuda:N or auto)")
        if self.device.startswith("cuda") and not cuda_available():
            raise ExporterError(f"device {self.device!r} requested but no CUDA device is available")
        if self.chunk_bytes is None:
            self.chunk_bytes = CHUNK_BYTES if self.device == "cpu" else DEVICE_CHUNK_BYTES
        if self.chunk_bytes < 1:
            raise ValueError(f"Converter.chunk_bytes must be positive, got {self.chunk_bytes}")
        if self.workers is None:
            self.workers = max(FILES_AT_ONCE, available_cores())
        if self.workers < 1:
            raise ValueError(f"Converter.workers must be positive, got {self.workers}")

    def output_dtype(self, job: TensorJob) -> DType:
        if self.dtype is not None and job.kind == "model" and job.dtype.is_floating_point:
            return self.dtype
        return job.dtype

    def engine_for(self, job: TensorJob) -> CastEngine:
        """The engine that casts ``job`` (one per writing thread): the GPU for floating tensors
        of 1 MiB or more (or one chunk, if smaller) when a CUDA device is selected, since small
        ones are not worth the transfers; else the CPU."""
        engines: dict[str, CastEngine] = self._local.__dict__.setdefault("engines", {})
        assert self.chunk_bytes is not None
        if self.device != "cpu" and job.dtype.is_floating_point:
            if job.numel * job.dtype.itemsize >= min(self.chunk_bytes, 1 << 20):
                if "device" not in engines:
                    from exporter.convert.device import DeviceCastEngine

                    engines["device"] = DeviceCastEngine(self.device, self.chunk_bytes)
                return engines["device"]
        if "cpu" not in engines:
            engines["cpu"] = CpuCastEngine()
        return engines["cpu"]

    def write_file(
        self,
        path: Path,
        jobs: Sequence[TensorJob],
        root: Path,
        metadata: dict[str, str] | None = None,
    ) -> list[WrittenRecord]:
        """Write ``jobs`` into the safetensors file ``path``; ``root`` makes the recorded path
        relative. The file's size and sha256 are appended to :attr:`written_files`."""
        return self.write_files([FileTask(Path(path), jobs, metadata)], root)

    def write_files(self, tasks: Sequence[FileTask], root: Path,
                    cancel: threading.Event | None = None) -> list[WrittenRecord]:
        """Write several files at once, up to :attr:`workers` in parallel, largest first.

        Returns the records of every file in ``tasks`` order, and appends the files to
        :attr:`written_files` in that order. The first error stops the other files (their
        partial outputs are removed) and is raised; so does setting ``cancel``.
        """
        cancel = cancel or threading.Event()
        results: list[tuple[list[WrittenRecord], WrittenFile] | None] = [None] * len(tasks)

        def run(index: int) -> None:
            try:
                results[index] = self._write_one(tasks[index], root, cancel)
            except BaseException:
                cancel.set()
                raise

        order = sorted(range(len(tasks)), key=lambda i: -_task_bytes(self, tasks[i]))
        assert self.workers is not None
        workers = min(self.workers, len(tasks))
        if workers <= 1:
            for index in order:
                run(index)
        else:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="convert-file")
            try:
                futures = [pool.submit(run, index) for index in order]
                wait(futures)
            except BaseException:
                # Ctrl-C (or any error) in this thread: the file threads stop at their next
                # chunk and remove their partial files before the caller removes the folder.
                cancel.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
            errors = [f.exception() for f in futures]
            real = [e for e in errors if e is not None and not isinstance(e, _Cancelled)]
            if real:
                raise real[0]
        if any(result is None for result in results):
            raise ExporterError("writing was cancelled")
        records: list[WrittenRecord] = []
        for result in results:
            assert result is not None
            records += result[0]
            self.written_files.append(result[1])
        return records

    def _write_one(
        self, task: FileTask, root: Path, cancel: threading.Event
    ) -> tuple[list[WrittenRecord], WrittenFile]:
        jobs = task.jobs
        specs = [TensorSpec(j.name, self.output_dtype(j), j.shape) for j in jobs]
        rel = str(task.path.relative_to(root)) if root else str(task.path)
        records: list[WrittenRecord] = []
        with _Writer(task.path, specs, task.metadata or {"format": "pt"},
                     direct=self.direct_io) as writer:
            file_digest = hashlib.sha256(writer.header)
            for job, spec in zip(jobs, specs, strict=True):
                digest, stats = self._write_tensor(job, spec, writer, file_digest, cancel)
                begin, end = writer.placed[len(records)].begin, writer.placed[len(records)].end
                records.append(WrittenRecord(job, rel, spec.dtype, begin, end, digest, stats,
                                             TENSOR_DIGEST))
        return records, WrittenFile(rel, writer.total_bytes, file_digest.hexdigest())

    def _write_tensor(
        self,
        job: TensorJob,
        spec: TensorSpec,
        writer: _Writer,
        file_digest: Hasher,
        cancel: threading.Event,
    ) -> tuple[str, TensorStats]:
        engine = self.engine_for(job)
        assert self.chunk_bytes is not None
        stats = StatsAccumulator()
        summarise = self.statistics and not engine.computes_stats
        digest = new_hasher(TENSOR_DIGEST)
        if spec.dtype == job.dtype and engine.passes_through and takes_place(job.chunks):
            chunks = job.chunks(self.chunk_bytes, writer.place)  # read where it is written
        else:
            chunks = job.chunks(self.chunk_bytes)
        source = _Counted(chunks, self._report if self.progress else None)
        for values, release in engine.cast(source, job.dtype, spec.dtype, stats):
            if cancel.is_set():
                raise _Cancelled
            data = _bytes_of(values)
            writer.write(job.name, data)
            file_digest.update(data)
            digest.update(data)
            if summarise:
                stats.update(values, spec.dtype)
            if release is not None:
                release()
        if source.elements != job.numel:
            raise ExporterError(
                f"{job.name}: source yielded {source.elements} elements, shape {job.shape} "
                f"needs {job.numel}"
            )
        return digest.hexdigest(), stats.result() if self.statistics else NO_STATS

    def _report(self, nbytes: int) -> None:
        assert self.progress is not None
        with self._lock:
            self.progress(nbytes)


class _Cancelled(Exception):
    """Another file of the same :meth:`Converter.write_files` call failed."""


def _task_bytes(converter: Converter, task: FileTask) -> int:
    return sum(job.numel * converter.output_dtype(job).itemsize for job in task.jobs)


class _Writer(SafetensorsWriter):
    """A :class:`SafetensorsWriter` whose bytes bypass the page cache where the file system
    allows (:class:`exporter.convert.direct.DirectFile`: the kernel neither copies nor caches
    what an export never reads back), and otherwise start going to disk as they are written.

    In the second case Linux starts writeback of a range's dirty pages on ``POSIX_FADV_DONTNEED``
    (``mm/fadvise.c`` ``generic_fadvise`` -> ``__filemap_fdatawrite_range``, without waiting),
    and drops them from the page cache once clean: the writer's final ``fsync`` then finds
    little left to flush, an export of hundreds of GB does not crowd the page cache, and
    (measured) page-cache writes cost less CPU when memory is not full of dirty pages.
    """

    def __init__(self, *args: Any, direct: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct = direct

    def __enter__(self) -> _Writer:
        self._advised = 0
        super().__enter__()
        return self

    def _open_file(self, path: Path) -> Any:
        found = DirectFile.create(path) if self._direct else None
        return found if found is not None else super()._open_file(path)

    @property
    def header(self) -> bytes:
        """The bytes in front of the tensor data (length prefix and JSON header)."""
        return self._header

    def place(self, nbytes: int) -> np.ndarray | None:
        """Memory to read the current tensor's next ``nbytes`` into (:data:`exporter.records.
        Place`): the staging buffer's, when the file is direct and the bytes go to an offset
        aligned for the tensor's dtype."""
        fh = self._fh
        if not isinstance(fh, DirectFile) or self._index >= len(self.specs):
            return None
        if fh.tell() % self.specs[self._index].dtype.itemsize:
            return None
        return fh.place(nbytes)

    def write(self, name: str, data: bytes | memoryview | bytearray) -> None:
        super().write(name, data)
        fh = self._fh
        if fh is not None and not isinstance(fh, DirectFile) and hasattr(os, "posix_fadvise"):
            end = fh.tell()
            if end - self._advised >= WRITEBACK_BYTES:
                fh.flush()
                os.posix_fadvise(fh.fileno(), self._advised, end - self._advised,
                                 os.POSIX_FADV_DONTNEED)
                self._advised = end


class _Counted:
    """Passes chunks through, counting elements and reporting source bytes to ``progress``."""

    def __init__(self, chunks: Iterator[np.ndarray], progress: Callable[[int], None] | None):
        self.elements = 0
        self._chunks = chunks
        self._progress = progress

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self._chunks:
            if type(chunk) is not np.ndarray:  # a torch tensor, from a job made outside
                chunk = from_torch(chunk)[0].reshape(-1)
            self.elements += chunk.size
            yield chunk
            if self._progress is not None:
                self._progress(chunk.nbytes)


def _bytes_of(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
