"""Per-tensor statistics, accumulated chunk by chunk in one pass per chunk.

Mean and variance are merged across chunks with Chan et al.'s pairwise update, so a tensor
never has to be in memory whole and no float64 copy of it is ever made (only of one chunk).
min / max / mean / std / l2 / absmax are over the finite values; NaN, ±inf and exact zeros
are counted over all values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class TensorStats:
    """Summary statistics of one tensor (``None`` where undefined, e.g. no finite value)."""

    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    l2: float | None
    absmax: float | None
    nan_count: int
    inf_count: int
    zero_count: int

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


class StatsAccumulator:
    """Feed 1-D chunks with :meth:`update`; read the result with :meth:`result`."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.nan = 0
        self.inf = 0
        self.zero = 0

    def update(self, chunk: torch.Tensor) -> None:
        if chunk.numel() == 0:
            return
        if chunk.dtype == torch.bool:
            chunk = chunk.to(torch.uint8)
        if chunk.is_complex():
            chunk = torch.view_as_real(chunk).reshape(-1)
        self.zero += int((chunk == 0).sum())
        if chunk.is_floating_point():
            finite = torch.isfinite(chunk)
            n_finite = int(finite.sum())
            if n_finite != chunk.numel():
                nan = int(torch.isnan(chunk).sum())
                self.nan += nan
                self.inf += chunk.numel() - n_finite - nan
                chunk = chunk[finite]
                if chunk.numel() == 0:
                    return
        values = chunk.to(torch.float64)
        n = values.numel()
        lo, hi = torch.aminmax(values)
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        total = float(values.sum())
        mean = total / n
        centered = values - mean
        m2 = float(torch.dot(centered, centered))
        self.sumsq += float(torch.dot(values, values))
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
        else:
            count = self.count + n
            delta = mean - self.mean
            self.mean += delta * n / count
            self.m2 += m2 + delta * delta * self.count * n / count
            self.count = count

    def result(self) -> TensorStats:
        if self.count == 0:
            return TensorStats(None, None, None, None, None, None, self.nan, self.inf, self.zero)
        return TensorStats(
            min=self.min,
            max=self.max,
            mean=self.mean,
            std=math.sqrt(max(self.m2, 0.0) / self.count),
            l2=math.sqrt(self.sumsq),
            absmax=max(abs(self.min), abs(self.max)),
            nan_count=self.nan,
            inf_count=self.inf,
            zero_count=self.zero,
        )
