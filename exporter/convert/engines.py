"""Cast engines: turn a tensor's source chunks into output chunks of the output dtype.

The CPU engine lives here; the GPU one, which also computes statistics, in
:mod:`exporter.convert.device`. :class:`exporter.convert.stream.Converter` picks one per tensor.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import numpy as np

from exporter.convert.stats import TORCH_SERIAL_ELEMENTS, StatsAccumulator
from exporter.dtypes import DType, to_torch

BUFFER_WAIT_S = 1.0  # the longest wait for a free cast buffer before a new one is made
CAST_BUFFERS = 2  # reusable output buffers: one being filled, one still held by the consumer

Release = Callable[[], None]


class CastEngine(Protocol):
    """Turns a tensor's source chunks (numpy arrays of ``source``, :data:`exporter.records.
    Chunks`) into output chunks of ``dtype`` on the host (numpy arrays of its
    :attr:`~exporter.dtypes.DType.numpy` type).

    ``cast`` yields ``(chunk, release)`` pairs in order; the caller calls ``release`` (when not
    None) once it no longer needs the chunk's memory. Engines with ``computes_stats`` fill
    ``stats`` with the statistics of the output values by the time the iterator is exhausted.
    Engines with ``passes_through`` yield a chunk already of ``dtype`` as it is, before taking
    the next: its memory may then be where the writer puts it
    (:func:`exporter.records.reads_into`).
    """

    computes_stats: bool
    passes_through: bool

    def cast(
        self, chunks: Iterable[np.ndarray], source: DType, dtype: DType, stats: StatsAccumulator
    ) -> Iterator[tuple[np.ndarray, Release | None]]: ...


class CpuCastEngine:
    """Casts on the CPU into a few reused buffers (fresh pages per chunk cost more than the
    cast); statistics are left to the caller. One engine per thread: it is not shared.

    The cast is torch's (imported on the first chunk that needs one): its round-to-nearest-even
    conversions and NaN patterns are those of the files torch itself would write."""

    computes_stats = False
    passes_through = True

    def __init__(self, buffers: int = CAST_BUFFERS) -> None:
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(buffers):
            self._free.put(np.empty(0, dtype=np.uint8))

    def cast(
        self, chunks: Iterable[np.ndarray], source: DType, dtype: DType, stats: StatsAccumulator
    ) -> Iterator[tuple[np.ndarray, Release | None]]:
        for chunk in chunks:
            if source == dtype:
                yield chunk, None
                continue
            try:
                # Bounded: a buffer whose chunk was dropped (an aborted file) never comes back,
                # and a Ctrl-C must not wait on it; the file threads bound the memory in use.
                buf = self._free.get(timeout=BUFFER_WAIT_S)
            except queue.Empty:
                buf = np.empty(0, dtype=np.uint8)
            nbytes = chunk.size * dtype.itemsize
            if buf.size < nbytes:
                buf = np.empty(nbytes, dtype=np.uint8)
            out = to_torch(buf[:nbytes], dtype)
            values = to_torch(chunk, source)
            # copy_ is what Tensor.to runs: torch's round-to-nearest-even conversion, here in
            # pieces that torch runs serially (see stats.TORCH_SERIAL_ELEMENTS): each file's
            # thread casts its own chunks, and OpenMP teams started from each would fight.
            for start in range(0, out.numel(), TORCH_SERIAL_ELEMENTS):
                stop = start + TORCH_SERIAL_ELEMENTS
                out[start:stop].copy_(values[start:stop])
            yield buf[:nbytes].view(dtype.numpy), _releaser(self._free, buf)


def _releaser(pool: queue.Queue[np.ndarray], buf: np.ndarray) -> Release:
    return lambda: pool.put(buf)
