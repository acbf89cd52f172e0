"""Row layouts of the column-parallel tensors Hugging Face keeps as several: QKV and up/gate.

Each tensor-parallel rank of a column-parallel layer holds its own slice of the output rows,
and the training code reads that slice with its own layout (GPT-NeoX
``megatron/model/transformer.py``):

- multi-head attention (``ParallelSelfAttention.forward``, no ``num-kv-heads`` below the head
  count): the rank's ``query_key_value`` output is viewed as ``[heads_of_rank, 3 * head_dim]``,
  so its rows are ``[q_h; k_h; v_h]`` for each of its heads in turn;
- grouped-query attention (``gqa_project``): the rank's rows are ``[q; k; v]`` blocks of
  ``heads_of_rank * head_dim``, ``kv_heads_of_rank * head_dim`` and ``kv_heads_of_rank * head_dim``;
- gated MLPs (``Gated_Activation.forward``: ``x, gate = x.chunk(2, dim=-1)``): the rank's
  ``linear1`` rows are ``[up; gate]`` halves, ``act(gate) * x``.

A Hugging Face part (``q_proj``, ``up_proj`` ...) is thus a list of row ranges of each rank's
shard, ranks in order; its rows are read range by range, never by merging whole shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from exporter.errors import LayoutError
from exporter.neox.names import Split

RowRanges = tuple[tuple[int, int], ...]  # (first row, number of rows) in one rank's shard


@dataclass(frozen=True)
class Heads:
    """Attention geometry of the whole model."""

    heads: int
    kv_heads: int
    head_dim: int
    grouped: bool  # gqa_project's [q; k; v] per rank, else per-head [q_h; k_h; v_h]


def split_rows(split: Split, rank_rows: int, tp: int, heads: Heads | None) -> list[RowRanges]:
    """For each part of ``split`` (q, k, v or up, gate): its row ranges in one rank's shard of
    ``rank_rows`` rows.

    Raises:
        LayoutError: the shard's rows do not fit the layout.
    """
    if split is Split.UP_GATE:
        if rank_rows % 2:
            raise LayoutError(f"a gated MLP's linear1 shard has an odd number of rows ({rank_rows})")
        half = rank_rows // 2
        return [((0, half),), ((half, half),)]
    if heads is None:
        raise LayoutError("splitting query_key_value needs the number of attention heads")
    if heads.heads % tp or heads.kv_heads % tp:
        raise LayoutError(
            f"{heads.heads} attention heads / {heads.kv_heads} kv heads do not divide over "
            f"{tp} tensor-parallel ranks"
        )
    h, kv, d = heads.heads // tp, heads.kv_heads // tp, heads.head_dim
    expected = (h + 2 * kv) * d
    if rank_rows != expected:
        raise LayoutError(
            f"a query_key_value shard has {rank_rows} rows; {h} heads and {kv} kv heads of "
            f"size {d} per rank make {expected}"
        )
    if heads.grouped:
        return [((0, h * d),), ((h * d, kv * d),), ((h * d + kv * d, kv * d),)]
    return [tuple((i * 3 * d + part * d, d) for i in range(h)) for part in range(3)]


def part_shape(shard_shape: tuple[int, ...], ranges: RowRanges, tp: int) -> tuple[int, ...]:
    """Shape of a part gathered from ``tp`` equal shards."""
    return (tp * sum(n for _, n in ranges), *shard_shape[1:])


def gathered_chunks(
    read_ranges: list[Callable[[int, int], np.ndarray]],
    shard_shape: tuple[int, ...],
    element_size: int,
    ranges: RowRanges,
) -> Callable[[int], Iterator[np.ndarray]]:
    """Chunks of a part: ``ranges`` of each rank's shard, ranks in order, read in blocks of
    rows of about ``max_bytes`` (``read_ranges[r](start, count)`` reads flat elements)."""
    width = math.prod(shard_shape[1:])

    def gen(max_bytes: int) -> Iterator[np.ndarray]:
        block = max(1, max_bytes // max(1, width * element_size))
        for read_range in read_ranges:
            for first, rows in ranges:
                for r0 in range(first, first + rows, block):
                    n = min(block, first + rows - r0)
                    yield read_range(r0 * width, n * width)

    return gen
