"""Per-tensor statistics, accumulated chunk by chunk in a few cache-sized passes.

min / max / mean / std / l2 / absmax are over the finite values (``std`` is the population
standard deviation, ``l2`` the square root of the sum of squares); NaN, ±inf and exact zeros
(``-0.0`` included) are counted over all values. Min, max and the counts are exact; mean, std
and l2 are computed in float64 throughout.

How a chunk is summarised (:meth:`StatsAccumulator.update`): it is cut into sub-blocks of
``SUB_BLOCK`` elements, each converted exactly to float64 in a reused per-thread buffer (never
a float64 copy of a whole chunk or tensor). Per sub-block, numpy (which releases the GIL, so
the hashing and writing threads run meanwhile) takes the sum (pairwise); a finite sum proves
every value finite, so NaN / inf masks are only built for sub-blocks that hold such values;
then min and max, the zero count (skipped when the range excludes zero), and the sum of
squared deviations from the sub-block mean (a two-pass variance, so constant data gives
exactly 0). Sub-block results are merged with the pairwise update of Chan, Golub and LeVeque
("Algorithms for computing the sample variance", 1983), which is also how partial results
computed elsewhere (the GPU path, :mod:`exporter.convert.device`) come in: :meth:`merge`.
``l2`` follows from ``Σx² = Σ(x - m)² + n m²`` (two non-negative terms).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from exporter.records import TensorStats

SUB_BLOCK = 1 << 20  # elements per pass: 8 MiB of float64 scratch
# at::internal::GRAIN_SIZE (ATen/Parallel.h): element-wise ops on fewer elements run serially.
TORCH_SERIAL_ELEMENTS = 32768
_NUMPY_NATIVE = (torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
                  torch.uint8)


class _Scratch(threading.local):
    """Per-thread reusable buffers: allocating fresh pages per chunk costs more than the math."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, role: str, dtype: np.dtype | type, size: int) -> np.ndarray:
        key = (role, np.dtype(dtype))
        buf = self.buffers.get(key)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, SUB_BLOCK), dtype=key[1])
            self.buffers[key] = buf
        return buf[:size]


_scratch = _Scratch()


class StatsAccumulator:
    """Feed 1-D chunks with :meth:`update` (or partial results with :meth:`merge`) in any
    order; read the result with :meth:`result`.

    Example:
        >>> acc = StatsAccumulator()
        >>> acc.update(torch.tensor([1.0, 2.0, float("nan")]))
        >>> acc.update(torch.tensor([0.0, 3.0]))
        >>> s = acc.result()
        >>> (s.min, s.max, s.mean, s.nan_count, s.zero_count)
        (0.0, 3.0, 1.5, 1, 1)
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.nan = 0
        self.inf = 0
        self.zero = 0

    def merge(
        self,
        count: int,
        mean: float,
        m2: float,
        min: float,  # noqa: A002 - mirrors the TensorStats field
        max: float,  # noqa: A002
        nan: int = 0,
        inf: int = 0,
        zero: int = 0,
    ) -> None:
        """Add the summary of some values: ``count`` finite ones with that ``mean``, sum of
        squared deviations ``m2``, ``min`` and ``max``; ``nan`` / ``inf`` / ``zero`` counts."""
        self.nan += int(nan)
        self.inf += int(inf)
        self.zero += int(zero)
        count = int(count)
        if count == 0:
            return
        self.min = min if min < self.min else self.min
        self.max = max if max > self.max else self.max
        if self.count == 0:
            self.count, self.mean, self.m2 = count, float(mean), float(m2)
            return
        total = self.count + count
        delta = float(mean) - self.mean
        self.mean += delta * count / total
        self.m2 += float(m2) + delta * delta * (self.count * count / total)
        self.count = total

    def update(self, chunk: torch.Tensor) -> None:
        """Add the values of ``chunk`` (any shape, CPU, any real, complex or bool dtype)."""
        if chunk.numel() == 0:
            return
        flat = chunk.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in a sum is expected
            for start in range(0, flat.numel(), SUB_BLOCK):
                self._add_block(flat[start : start + SUB_BLOCK])

    def _add_block(self, block: torch.Tensor) -> None:
        n = block.numel()
        values = _float64_copy(block)
        total = float(np.add.reduce(values))
        if math.isfinite(total):
            # min, max and zeros are exact on the source values, and cheaper on float32.
            source = block.numpy() if block.dtype == torch.float32 else values
            finite = values
            lo, hi = source.min(), source.max()
            zero = _count_zeros(source) if lo <= 0 <= hi else 0
        else:
            # NaN or ±inf somewhere (or a float64 sum that overflowed).
            mask = np.isfinite(values)
            n_nan = int(np.count_nonzero(np.isnan(values)))
            n_finite = int(np.count_nonzero(mask))
            zero = _count_zeros(values)
            finite = values[mask] if n_finite != n else values
            self.nan += n_nan
            self.inf += n - n_finite - n_nan
            if finite.size == 0:
                self.zero += zero
                return
            total = float(np.add.reduce(finite))
            lo, hi = finite.min(), finite.max()
        count = finite.size
        mean = total / count
        # Squares summed by numpy's pairwise add, not np.dot: BLAS would start threads of its own.
        np.subtract(finite, mean, out=finite)
        np.square(finite, out=finite)
        m2 = float(np.add.reduce(finite))
        self.merge(count, mean, m2, float(lo), float(hi), zero=zero)

    def result(self) -> TensorStats:
        if self.count == 0:
            return TensorStats(None, None, None, None, None, None, self.nan, self.inf, self.zero)
        return TensorStats(
            min=self.min,
            max=self.max,
            mean=self.mean,
            std=math.sqrt(max(self.m2, 0.0) / self.count),
            l2=math.sqrt(max(self.m2, 0.0) + self.count * self.mean * self.mean),
            absmax=max(abs(self.min), abs(self.max)),
            nan_count=self.nan,
            inf_count=self.inf,
            zero_count=self.zero,
        )


def _float64_copy(block: torch.Tensor) -> np.ndarray:
    """``block`` converted exactly to float64, in a per-thread scratch buffer."""
    out = _scratch.get("values", np.float64, block.numel())
    if block.dtype in _NUMPY_NATIVE:
        np.copyto(out, block.numpy())
        return out
    # numpy has no bfloat16 and converts float16 without SIMD, so torch converts; in pieces of
    # at most torch's grain size, which it runs on the calling thread: an OpenMP team started
    # from each pipeline thread would spin against the others for the few cores there are.
    target = torch.from_numpy(out)
    for start in range(0, block.numel(), TORCH_SERIAL_ELEMENTS):
        stop = start + TORCH_SERIAL_ELEMENTS
        target[start:stop].copy_(block[start:stop])
    return out


def _count_zeros(values: np.ndarray) -> int:
    # np.equal into a reused bool buffer then counting is ~3x faster than count_nonzero on floats.
    flags = _scratch.get("zeros", np.bool_, values.size)
    np.equal(values, 0, out=flags)
    return int(np.count_nonzero(flags))
