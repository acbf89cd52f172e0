"""Casts and statistics on a GPU, fed by pinned, double-buffered host-to-device copies.

For each source chunk (host memory, as the readers produce it):

1. the calling thread copies it into one of ``slots`` pinned staging buffers (chunks that are
   already pinned are used as they are);
2. a copy stream moves it to the matching device buffer and records an event;
3. the compute stream waits for that event, casts, computes the chunk's moments in float64 and
   copies the cast bytes and the moments back into a pinned output buffer, then records an
   event;
4. the chunk before it is handed on once its event has fired, while this one is in flight.

So the staging copy of chunk i+1, the transfer of chunk i+1 and the compute and copy back of
chunk i overlap. Output buffers come from a small pool and return to it when the consumers
(hashing, writing) release them.

Bitwise agreement with the CPU cast: CUDA and CPU both round to nearest even
(c10 ``BFloat16.h`` / ``Half.h``), but NaN bit patterns differ (CUDA's ``__float2bfloat16``
gives ``0x7fff``, torch's vectorised CPU conversion ``0xffff``; float16 NaN payloads differ
too). A chunk whose moments report NaNs therefore gets its NaN elements re-cast on the host
from the source values, which the engine keeps until the chunk is handed on.

Statistics agree with :class:`exporter.convert.stats.StatsAccumulator`: each chunk's
count, mean, sum of squared deviations (two passes in float64), min, max and NaN / inf / zero
counts are merged on the host, chunk by chunk, with the same pairwise update.

The engine runs on any torch device: on the CPU the streams and events are skipped and every
step runs in order, which lets the pipeline logic be tested where there is no GPU.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from exporter.convert.stats import StatsAccumulator
from exporter.dtypes import DType, to_torch
from exporter.errors import ExporterError

STAGING_SLOTS = 2
OUTPUT_BUFFERS = 4
MOMENTS = 8  # count, mean, m2, min, max, nan, inf, zero
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def device_moments(values: torch.Tensor) -> torch.Tensor:
    """The moments of a 1-D tensor, computed where it lives, as a float64 tensor of 8:
    finite count, mean and sum of squared deviations of the finite values, their min and max
    (+inf / -inf when there are none), NaN, inf and zero counts. Counts below 2**53 are exact."""
    if values.dtype == torch.bool:
        values = values.view(torch.uint8)
    if values.is_complex():
        values = torch.view_as_real(values).reshape(-1)
    wide = values.to(torch.float64)
    n = wide.numel()
    finite = torch.isfinite(wide)
    count = finite.sum(dtype=torch.float64)
    nan = torch.isnan(wide).sum(dtype=torch.float64)
    zero = (wide == 0).sum(dtype=torch.float64)
    kept = torch.where(finite, wide, 0.0)
    mean = kept.sum() / count.clamp(min=1.0)
    deviations = torch.where(finite, wide - mean, 0.0)
    m2 = torch.dot(deviations, deviations)
    lo = torch.where(finite, wide, torch.inf).amin() if n else wide.new_tensor(torch.inf)
    hi = torch.where(finite, wide, -torch.inf).amax() if n else wide.new_tensor(-torch.inf)
    return torch.stack([count, mean, m2, lo, hi, nan, n - count - nan, zero])


def merge_moments(stats: StatsAccumulator, moments: torch.Tensor) -> None:
    """Add one chunk's :func:`device_moments` (on the host) to ``stats``."""
    count, mean, m2, lo, hi, nan, inf, zero = moments.tolist()
    stats.merge(int(count), mean, m2, lo, hi, int(nan), int(inf), int(zero))


@dataclass
class _InFlight:
    """A chunk between submission and hand-over."""

    source: torch.Tensor  # host source values, kept for the NaN fix-up
    output: torch.Tensor  # typed view of the host output buffer
    moments: torch.Tensor  # host float64[8]
    buffer: tuple[torch.Tensor, torch.Tensor]  # (output bytes, moments) pool entry
    done: Any  # torch.cuda.Event, or None on the CPU


class DeviceCastEngine:
    """A :class:`exporter.convert.stream.CastEngine` that casts and summarises on ``device``.

    Args:
        device: ``cuda``, ``cuda:N`` (or ``cpu``, where it runs every step in order).
        chunk_bytes: the largest source chunk, in bytes.
        slots: staging buffers (2 = double buffering).
        output_buffers: host output buffers shared with the consumers.
    """

    computes_stats = True
    passes_through = False  # chunks go to the GPU while the next ones are read

    def __init__(
        self,
        device: str | torch.device,
        chunk_bytes: int,
        slots: int = STAGING_SLOTS,
        output_buffers: int = OUTPUT_BUFFERS,
    ) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise ExporterError(f"device {device!r} requested but no CUDA device is available")
        if slots < 1 or output_buffers < 1:
            raise ValueError("DeviceCastEngine needs at least one staging and one output buffer")
        self.chunk_bytes = chunk_bytes
        self.slots = slots
        self._staging = [self._host(chunk_bytes) for _ in range(slots)]
        self._device_in = [torch.empty(chunk_bytes, dtype=torch.uint8, device=self.device)
                           for _ in range(slots)]
        self._free: queue.Queue[tuple[torch.Tensor, torch.Tensor]] = queue.Queue()
        for _ in range(output_buffers):
            self._free.put((self._host(chunk_bytes), self._host_moments()))
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._compute_stream = torch.cuda.Stream(self.device)
            self._copied = [torch.cuda.Event() for _ in range(slots)]
            self._consumed = [torch.cuda.Event() for _ in range(slots)]
        self._submitted = [False] * slots
        self._next_slot = 0

    def _host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def _host_moments(self) -> torch.Tensor:
        return torch.empty(MOMENTS, dtype=torch.float64, pin_memory=self.cuda)

    def cast(
        self, chunks: Iterable[np.ndarray], source: DType, dtype: DType, stats: StatsAccumulator
    ) -> Iterator[tuple[np.ndarray, Any]]:
        """Cast ``chunks`` (numpy arrays of ``source``) to ``dtype`` on the device; yields
        ``(host chunk, release)`` in order, each chunk a numpy array of ``dtype``'s
        :attr:`~exporter.dtypes.DType.numpy` type, and merges each chunk's statistics into
        ``stats`` as it is handed over."""
        pending: deque[_InFlight] = deque()
        target = dtype.torch
        try:
            for chunk in chunks:
                pending.append(self._submit(to_torch(chunk.reshape(-1), source), target))
                if len(pending) > 1:
                    yield self._host_chunk(pending.popleft(), target, dtype, stats)
            while pending:
                yield self._host_chunk(pending.popleft(), target, dtype, stats)
        finally:
            # An abandoned iteration must not leave copies writing into buffers it returns.
            for item in pending:
                if item.done is not None:
                    item.done.synchronize()
                self._free.put(item.buffer)

    def _submit(self, source: torch.Tensor, dtype: torch.dtype) -> _InFlight:
        nbytes = source.numel() * source.element_size()
        out_nbytes = source.numel() * dtype.itemsize
        if nbytes > self.chunk_bytes:
            raise ExporterError(
                f"chunk of {nbytes} bytes exceeds the engine's {self.chunk_bytes}-byte buffers"
            )
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.slots
        if self.cuda and self._submitted[slot]:
            # The previous transfer out of this staging buffer must be over before refilling it.
            self._copied[slot].synchronize()
        raw = source.view(torch.uint8)
        if self.cuda and raw.is_pinned():
            staged = raw  # kept alive by the _InFlight record until handed over
        else:
            staged = self._staging[slot][:nbytes]
            staged.copy_(raw)
        device_in = self._device_in[slot][:nbytes]
        with self._on(self._copy_stream if self.cuda else None):
            if self.cuda:
                # The device buffer is free once the compute that read it last has run.
                self._copy_stream.wait_event(self._consumed[slot])
            device_in.copy_(staged, non_blocking=self.cuda)
            if self.cuda:
                self._copied[slot].record(self._copy_stream)
        self._submitted[slot] = True
        out_bytes, moments = self._take_buffer(out_nbytes)
        with self._on(self._compute_stream if self.cuda else None):
            if self.cuda:
                self._compute_stream.wait_event(self._copied[slot])
            values = device_in.view(source.dtype)
            cast = values.to(dtype) if dtype != source.dtype else values
            chunk_moments = device_moments(cast)
            output = out_bytes[:out_nbytes]
            output.copy_(cast.reshape(-1).view(torch.uint8), non_blocking=self.cuda)
            moments.copy_(chunk_moments, non_blocking=self.cuda)
            done = None
            if self.cuda:
                self._consumed[slot].record(self._compute_stream)
                done = torch.cuda.Event()
                done.record(self._compute_stream)
        return _InFlight(source, output.view(dtype), moments, (out_bytes, moments), done)

    def _host_chunk(self, item: _InFlight, target: torch.dtype, dtype: DType,
                    stats: StatsAccumulator) -> tuple[np.ndarray, Any]:
        output, release = self._hand_over(item, target, stats)
        return output.view(torch.uint8).numpy().view(dtype.numpy), release

    def _take_buffer(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        out_bytes, moments = self._free.get()
        if out_bytes.numel() < nbytes:
            # Casts that widen (float16 -> float32) need more than one source chunk's bytes.
            out_bytes = self._host(nbytes)
        return out_bytes, moments

    def _hand_over(
        self, item: _InFlight, dtype: torch.dtype, stats: StatsAccumulator
    ) -> tuple[torch.Tensor, Any]:
        if item.done is not None:
            item.done.synchronize()
        merge_moments(stats, item.moments)
        if item.moments[5].item() > 0 and dtype != item.source.dtype:
            nan = torch.isnan(item.source)
            # Through integer views: an index_put_ of floats canonicalises NaN bit patterns.
            bits = _BIT_VIEWS[dtype.itemsize]
            item.output.view(bits)[nan] = item.source[nan].to(dtype).view(bits)
        buffer = item.buffer
        return item.output, lambda: self._free.put(buffer)

    @staticmethod
    def _on(stream: Any) -> Any:
        return torch.cuda.stream(stream) if stream is not None else nullcontext()
