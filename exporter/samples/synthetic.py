"""Seeded random checkpoint values, regenerated on demand in fixed-size chunks.

Any slice of any tensor can be produced without the rest of the model, so files of
Pythia-sized checkpoints stream with about one file's tensors in memory, and the ground truth
of a written checkpoint costs no memory until asked for.
"""

from __future__ import annotations

import hashlib

import torch

from exporter.samples.shapes import ModelShape, Parallel, ParamSpec

CHUNK = 1 << 20  # elements generated per seeded draw


def _init_std(spec: ParamSpec, shape: ModelShape) -> float:
    """GPT-NeoX ``small_init`` for inputs, ``wang_init`` for the residual outputs."""
    if spec.key in ("attention.dense.weight", "mlp.dense_4h_to_h.weight"):
        return 2.0 / shape.num_layers / shape.hidden_size**0.5
    return (2.0 / (5.0 * shape.hidden_size)) ** 0.5


class SyntheticSource:
    """Random fp32 masters and Adam moments that look like a run in progress.

    ``step0=True`` mimics a checkpoint taken before the first update: masters are exactly
    representable in the model dtype (stage 1 clones them from the half-precision model) and
    the moments are zero (only the zero-gradient set-up step has run).
    """

    def __init__(self, shape: ModelShape, seed: int, dtype: torch.dtype, *, step0: bool) -> None:
        self.shape = shape
        self.seed = seed
        self.dtype = dtype
        self.step0 = step0
        self._last: tuple[tuple[object, ...], torch.Tensor] | None = None

    def flat(self, kind: str, tp_rank: int, spec: ParamSpec, start: int, stop: int) -> torch.Tensor:
        if kind != "master" and self.step0:
            return torch.zeros(stop - start)
        # Norms and row-parallel biases see the same gradients on every tp rank, so they stay
        # identical across ranks in a real run.
        owner = tp_rank if spec.parallel in (Parallel.COLUMN, Parallel.ROW) else 0
        out = torch.empty(stop - start)
        first, last = start // CHUNK, (stop - 1) // CHUNK if stop > start else -1
        for index in range(first, last + 1):
            chunk = self._chunk(kind, owner, spec, index)
            lo, hi = max(start, index * CHUNK), min(stop, (index + 1) * CHUNK)
            out[lo - start : hi - start] = chunk[lo - index * CHUNK : hi - index * CHUNK]
        return out

    def _chunk(self, kind: str, owner: int, spec: ParamSpec, index: int) -> torch.Tensor:
        key = (kind, owner, spec.name, index)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        digest = hashlib.blake2b(repr((self.seed, *key)).encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        size = min(CHUNK, spec.numel - index * CHUNK)
        values = torch.randn(size, generator=generator)
        if kind == "master":
            values = self._master(values, spec)
        elif kind == "exp_avg":
            values.mul_(1e-4)
        else:
            values.square_().mul_(1e-8)
        self._last = (key, values)
        return values

    def _master(self, values: torch.Tensor, spec: ParamSpec) -> torch.Tensor:
        if spec.key.endswith("norm.weight"):
            values.mul_(0.05).add_(1.0)
        elif spec.key.endswith("bias"):
            values.mul_(0.02)
        else:
            values.mul_(_init_std(spec, self.shape))
        if self.step0:
            values = values.to(self.dtype).float()
        return values
