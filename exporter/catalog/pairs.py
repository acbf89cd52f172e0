"""Sums over a pair of same-shaped tensors, in float64, a chunk at a time.

Both ``compare`` (two runs, one step) and ``deltas`` (one run, two steps) need the same four
sums: ``<a,a>``, ``<b,b>``, ``<a,b>`` and ``<a-b,a-b>``. Tensors arrive memory-mapped in their
stored dtype (fp16, bf16, fp32); each chunk is widened to float64 on its own, so memory stays
at the pair of mapped tensors plus two chunks, never a float64 copy of a whole tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from exporter.errors import CatalogError

CHUNK = 1 << 20  # elements widened to float64 at a time (8 MiB per operand)


@dataclass(frozen=True)
class PairSums:
    """``aa = <a,a>``, ``bb = <b,b>``, ``ab = <a,b>``, ``dd = <a-b,a-b>``, in float64."""

    numel: int
    aa: float
    bb: float
    ab: float
    dd: float

    @property
    def l2_a(self) -> float:
        return math.sqrt(self.aa)

    @property
    def l2_b(self) -> float:
        return math.sqrt(self.bb)

    @property
    def distance(self) -> float:
        """``||a - b||``."""
        return math.sqrt(self.dd)

    @property
    def relative(self) -> float | None:
        """``||a - b|| / ||a||``; 0 for equal tensors, None when ``a`` is zero and ``b`` not."""
        if self.dd == 0:
            return 0.0
        return self.distance / self.l2_a if self.aa > 0 else None

    @property
    def cosine(self) -> float | None:
        """``<a,b> / (||a|| ||b||)``, clamped to [-1, 1]; None when either tensor is zero."""
        if self.aa == 0 or self.bb == 0:
            return None
        return max(-1.0, min(1.0, self.ab / math.sqrt(self.aa * self.bb)))


def pair_sums(a: torch.Tensor, b: torch.Tensor, what: str) -> PairSums:
    """The four sums of ``a`` and ``b`` (same shape; ``what`` names them in an error)."""
    if a.shape != b.shape:
        raise CatalogError(f"{what}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    aa = bb = ab = dd = 0.0
    for start in range(0, flat_a.numel(), CHUNK):
        x = flat_a[start:start + CHUNK].to(torch.float64)
        y = flat_b[start:start + CHUNK].to(torch.float64)
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
        ab += float(torch.dot(x, y))
        x.sub_(y)
        dd += float(torch.dot(x, x))
    return PairSums(flat_a.numel(), aa, bb, ab, dd)
