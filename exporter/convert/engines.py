"""Cast engines: turn a tensor's source chunks into output chunks of the output dtype.

The CPU engine lives here; the GPU one, which also computes statistics, in
:mod:`exporter.convert.device`. :class:`exporter.convert.stream.Converter` picks one per tensor.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch

from exporter.convert.stats import TORCH_SERIAL_ELEMENTS, StatsAccumulator

BUFFER_WAIT_S = 1.0  # the longest wait for a free cast buffer before a new one is made
CAST_BUFFERS = 2  # reusable output buffers: one being filled, one still held by the consumer

Release = Callable[[], None]


class CastEngine(Protocol):
    """Turns a tensor's source chunks into output chunks of ``dtype`` on the host.

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
        self, chunks: Iterable[torch.Tensor], dtype: torch.dtype, stats: StatsAccumulator
    ) -> Iterator[tuple[torch.Tensor, Release | None]]: ...


class CpuCastEngine:
    """Casts on the CPU into a few reused buffers (fresh pages per chunk cost more than the
    cast); statistics are left to the caller. One engine per thread: it is not shared."""

    computes_stats = False
    passes_through = True

    def __init__(self, buffers: int = CAST_BUFFERS) -> None:
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(buffers):
            self._free.put(torch.empty(0, dtype=torch.uint8))

    def cast(
        self, chunks: Iterable[torch.Tensor], dtype: torch.dtype, stats: StatsAccumulator
    ) -> Iterator[tuple[torch.Tensor, Release | None]]:
        for chunk in chunks:
            if chunk.dtype == dtype:
                yield chunk, None
                continue
            try:
                # Bounded: a buffer whose chunk was dropped (an aborted file) never comes back,
                # and a Ctrl-C must not wait on it; the file threads bound the memory in use.
                buf = self._free.get(timeout=BUFFER_WAIT_S)
            except queue.Empty:
                buf = torch.empty(0, dtype=torch.uint8)
            nbytes = chunk.numel() * dtype.itemsize
            if buf.numel() < nbytes:
                buf = torch.empty(nbytes, dtype=torch.uint8)
            out = buf[:nbytes].view(dtype)
            # copy_ is what Tensor.to runs: torch's round-to-nearest-even conversion, here in
            # pieces that torch runs serially (see stats.TORCH_SERIAL_ELEMENTS): each file's
            # thread casts its own chunks, and OpenMP teams started from each would fight.
            for start in range(0, out.numel(), TORCH_SERIAL_ELEMENTS):
                stop = start + TORCH_SERIAL_ELEMENTS
                out[start:stop].copy_(chunk[start:stop])
            yield out, _releaser(self._free, buf)


def _releaser(pool: queue.Queue[torch.Tensor], buf: torch.Tensor) -> Release:
    return lambda: pool.put(buf)
