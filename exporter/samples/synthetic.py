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


def init_std(spec: ParamSpec, shape: ModelShape) -> float:
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
        self._last: dict[str, tuple[tuple[int, str, int], torch.Tensor]] = {}

    def fill(self, kind: str, tp_rank: int, spec: ParamSpec, start: int, out: torch.Tensor) -> None:
        if kind != "master" and self.step0:
            out.zero_()
            return
        # Norms and row-parallel biases see the same gradients on every tp rank, so they stay
        # identical across ranks in a real run.
        owner = tp_rank if spec.parallel in (Parallel.COLUMN, Parallel.ROW) else 0
        stop = start + out.numel()
        for index in range(start // CHUNK, (stop + CHUNK - 1) // CHUNK):
            chunk_start = index * CHUNK
            chunk_stop = min(chunk_start + CHUNK, spec.numel)
            lo, hi = max(start, chunk_start), min(stop, chunk_stop)
            if (lo, hi) == (chunk_start, chunk_stop):
                self._draw(kind, owner, spec, index, out[lo - start : hi - start])
            else:
                chunk = self._partial_chunk(kind, owner, spec, index, chunk_stop - chunk_start)
                out[lo - start : hi - start] = chunk[lo - chunk_start : hi - chunk_start]

    def _partial_chunk(self, kind: str, owner: int, spec: ParamSpec, index: int,
                       numel: int) -> torch.Tensor:
        # Small ZeRO comm intervals ask for many small slices of one chunk in a row: the last
        # chunk drawn per kind is kept, so each is drawn about once, not once per slice.
        key = (owner, spec.name, index)
        cached = self._last.get(kind)
        if cached is not None and cached[0] == key:
            return cached[1]
        chunk = torch.empty(numel)
        self._draw(kind, owner, spec, index, chunk)
        self._last[kind] = (key, chunk)
        return chunk

    def _draw(self, kind: str, owner: int, spec: ParamSpec, index: int, out: torch.Tensor) -> None:
        """Chunk ``index`` of one tensor, written into ``out`` (one pass over memory)."""
        digest = hashlib.blake2b(
            repr((self.seed, kind, owner, spec.name, index)).encode(), digest_size=8
        ).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        if kind == "exp_avg":
            out.normal_(0.0, 1e-4, generator=generator)
        elif kind == "exp_avg_sq":
            out.uniform_(0.0, 1e-8, generator=generator)
        elif spec.key.endswith("norm.weight"):
            out.normal_(1.0, 0.05, generator=generator)
        elif spec.key.endswith("bias"):
            out.normal_(0.0, 0.02, generator=generator)
        else:
            out.normal_(0.0, init_std(spec, self.shape), generator=generator)
        if kind == "master" and self.step0:
            out.copy_(out.to(self.dtype))
