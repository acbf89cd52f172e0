"""Shared pieces of the ZeRO readers: parameter slices of partition files, and their jobs.

A ZeRO partition file holds, per param group, one flat fp32 tensor (the rank's slice of the
group's flattened parameters) and the Adam moments of the same slice. A parameter is thus a
list of :class:`Segment` s — contiguous element ranges of partition tensors, possibly on
several ranks — and is read segment by segment, never by concatenating whole partitions.

A partition can hold thousands of small segments (DeeperSpeed stage 1 with a small
``reduce_bucket_size`` cuts each group into one comm interval per bucket, and a parameter's
consecutive sub-partitions alternate between the rank files), so :meth:`ParamSlices.chunks`
gathers segments straight into chunk-sized buffers (:mod:`exporter.neox.zero.gather`: a few
vectored reads per chunk, one open file per rank file for the whole tensor, no object per
segment), in chunks of the requested size however small the segments are.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple

import numpy as np

from exporter.dtypes import DType, to_torch
from exporter.errors import CheckpointFormatError, LayoutError
from exporter.neox.zero.gather import gather_chunks
from exporter.torchfile import TensorRef
from exporter.torchfile.records import read_tensor


class Segment(NamedTuple):
    """Elements ``[start, start + count)`` of a 1-D partition tensor.

    A named tuple: a partition of many comm intervals makes one per parameter and interval
    (hundreds of thousands), and :meth:`FlatLayout.covering`, the one place that makes them,
    checks the range against the partition.
    """

    ref: TensorRef
    start: int
    count: int

    def read(self) -> np.ndarray:
        size = self.ref.element_size
        return read_tensor(self.ref.path, self.ref.file_offset + self.start * size,
                           self.count * size, self.ref.dtype)


@dataclass
class ParamSlices:
    """One parameter of one model-parallel unit: its shape and where each kind lies."""

    name: str
    shape: tuple[int, ...]
    group: int
    segments: dict[str, Segments] = field(default_factory=dict)

    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, kind: str) -> np.ndarray:
        """One kind, whole, as a numpy array of the parameter's shape."""
        parts = [s.read() for s in self.segments[kind]]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return flat.reshape(self.shape)

    def read_range(self, kind: str, start: int, count: int) -> np.ndarray:
        """Flat elements ``[start, start + count)`` of one kind, reading only those bytes."""
        parts = [seg.read() for seg in self.segments[kind].covering(start, count, self.name)]
        if not parts:
            return np.empty(0, dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def chunks(self, kind: str) -> Callable[[int], Iterator[np.ndarray]]:
        """Chunks of about ``max_bytes`` of one kind, each gathered from as many segments as
        it spans (:mod:`exporter.neox.zero.gather`)."""
        return gather_chunks(self.segments[kind], f"{self.name}: {kind}")


def flat_partition(ref: Any, where: str) -> TensorRef:
    """Check that ``ref`` is a 1-D contiguous tensor (a flat ZeRO partition)."""
    if not isinstance(ref, TensorRef):
        raise LayoutError(f"{where}: expected a flat partition tensor, found {type(ref).__name__}")
    if len(ref.shape) != 1 or (ref.stride[0] != 1 and ref.shape[0] > 1):
        raise LayoutError(f"{where}: partition tensor has shape {list(ref.shape)}, expected 1-D")
    return ref


class FlatLayout:
    """A flat sequence laid out as ``spans``, each ``(ref, start, size)``: ``size`` elements of
    partition tensor ``ref`` from element ``start`` on, back to back.

    The one slicing routine of the ZeRO readers, for every layout they meet: a group's padded
    partitions (current DeepSpeed: each rank spans the partition size, the last rank's tensor
    may be trimmed), sub-partitions back to back (DeeperSpeed elastic: thousands of comm
    intervals with a small bucket), and a parameter's own segments. The start of each span is
    computed once, and a binary search finds the first span of a range: a scan from the first
    span for every parameter made planning quadratic in the number of comm intervals.
    """

    def __init__(self, spans: list[tuple[TensorRef, int, int]]) -> None:
        self.spans = spans
        self.starts = list(itertools.accumulate((size for _, _, size in spans[:-1]), initial=0))
        self.total = self.starts[-1] + spans[-1][2] if spans else 0
        # Flat ranges a span covers but its tensor does not hold (a trimmed last partition).
        self._missing = [
            (self.starts[i] + max(0, ref.numel - start), self.starts[i] + size, i)
            for i, (ref, start, size) in enumerate(spans) if start + size > ref.numel
        ]

    @classmethod
    def whole(cls, refs: list[TensorRef]) -> FlatLayout:
        """Every element of each of ``refs``, back to back."""
        return cls.in_turns([refs], np.fromiter(map(attrgetter("numel"), refs), np.int64, len(refs)))

    @classmethod
    def in_turns(cls, lists: list[Any], sizes: np.ndarray) -> FlatLayout:
        """Every element of the tensors of ``lists`` (of one length) taken in turns: the first
        of each list, then the second of each, ... (DeeperSpeed's sub-partitions, the ranks
        taking turns); ``sizes``: their element counts in that order. A span's record is
        taken from its list only when asked for (:class:`_InTurns`)."""
        layout = cls.__new__(cls)
        layout.spans = _InTurns(lists, sizes.tolist())
        starts = np.zeros(max(1, len(sizes)), dtype=np.int64)
        np.cumsum(sizes[:-1], out=starts[1 : len(sizes)])
        layout.starts = starts.tolist()
        layout.total = int(starts[-1] + sizes[-1]) if len(sizes) else 0
        layout._missing = []
        return layout

    def span_sizes(self) -> np.ndarray:
        """The element count of each span."""
        if type(self.spans) is _InTurns:
            return np.array(self.spans.sizes, dtype=np.int64)
        return np.fromiter(map(itemgetter(2), self.spans), np.int64, len(self.spans))

    def covering(self, begin: int, count: int, what: str) -> Segments:
        """The segments holding elements ``[begin, begin + count)``, checked now and made as
        they are iterated (a parameter of a many-interval partition spans thousands)."""
        end = begin + count
        if begin < 0 or count < 0 or end > self.total:
            raise LayoutError(f"{what}: elements [{begin}, {end}) run past the last partition "
                              f"({self.total} elements; partition count mismatch?)")
        for low, high, index in self._missing:
            if count and begin < high and end > low:
                ref, start, _ = self.spans[index]
                first = start + max(begin, self.starts[index]) - self.starts[index]
                raise CheckpointFormatError(
                    f"{ref.path}: slice [{first}, {first + min(end, high) - max(begin, low)}) "
                    f"lies outside a partition of {ref.numel} elements"
                )
        return Segments(self, begin, count)

    def segments(self, begin: int, count: int) -> Iterator[Segment]:
        index = max(0, bisect.bisect_right(self.starts, begin) - 1)
        pos, end = begin, begin + count
        spans, starts = self.spans, self.starts
        while pos < end:
            ref, start, size = spans[index]
            local = pos - starts[index]
            take = min(end - pos, size - local)
            if take > 0:
                yield Segment(ref, start + local, take)
                pos += take
            index += 1


class _InTurns:
    """The spans ``(record, 0, size)`` of :meth:`FlatLayout.in_turns`: the records stay in
    their lists (a list of records left as :class:`~exporter.torchfile.runs.RecordRun` makes
    only those asked for)."""

    __slots__ = ("lists", "sizes")

    def __init__(self, lists: list[Any], sizes: list[int]) -> None:
        self.lists = lists
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> tuple[TensorRef, int, int]:
        size = self.sizes[index]  # an index out of range fails here
        width = len(self.lists)
        index %= len(self.sizes)
        return self.lists[index % width][index // width], 0, size


class Segments:
    """A parameter's elements ``[begin, begin + count)`` of one :class:`FlatLayout`: iterates
    as :class:`Segment` s, and keeps no object per segment between iterations."""

    __slots__ = ("layout", "begin", "count")

    def __init__(self, layout: FlatLayout, begin: int, count: int) -> None:
        self.layout = layout
        self.begin = begin
        self.count = count

    def __iter__(self) -> Iterator[Segment]:
        return self.layout.segments(self.begin, self.count)

    def __bool__(self) -> bool:
        return self.count > 0

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @property
    def first(self) -> TensorRef:
        """The partition tensor that holds the first element."""
        return next(iter(self)).ref

    def covering(self, start: int, count: int, what: str) -> Segments:
        """Elements ``[start, start + count)`` of this range."""
        if start < 0 or count < 0 or start + count > self.count:
            raise LayoutError(f"{what}: elements [{start}, {start + count}) outside a parameter "
                              f"of {self.count}")
        return Segments(self.layout, self.begin + start, count)


def partition_state_dicts(files: list[Any]) -> list[dict[str, Any]]:
    """Each partition file's ``optimizer_state_dict``, checked against the number of files.

    ``partition_count`` is an int (stage 1 elastic) or one int per param group (current
    DeepSpeed); either way it must equal the number of data-parallel files found.
    """
    dp = len(files)
    states = []
    for tf in files:
        osd = tf.obj.get("optimizer_state_dict") if isinstance(tf.obj, dict) else None
        if not isinstance(osd, dict):
            raise LayoutError(f"{tf.path}: no 'optimizer_state_dict'")
        count = osd.get("partition_count")
        counts = count if isinstance(count, (list, tuple)) else [count]
        if not counts or any(c != dp for c in counts):
            hint = ""
            if all(isinstance(c, int) and not isinstance(c, bool) for c in counts) and counts[0] > dp:
                name = re.sub(r"zero_pp_rank_\d+_", f"zero_pp_rank_{dp}_", tf.path.name)
                hint = f" (missing {name}?)"
            raise LayoutError(
                f"{tf.path}: partition_count {count!r} disagrees with the {dp} partition files "
                f"found{hint}"
            )
        states.append(osd)
    return states


def scalar(value: Any) -> Any:
    """A Python number from a pickled scalar or a one-element tensor record."""
    if isinstance(value, TensorRef):
        if value.numel != 1:
            return None
        return scalar_of(value.read_array().reshape(-1), value.dtype)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


def scalar_of(array: np.ndarray, dtype: DType) -> Any:
    """The first element of ``array`` (of ``dtype``'s numpy type) as a Python number; bfloat16
    and float8 bit patterns through torch."""
    if dtype.is_bits:
        return to_torch(array[:1], dtype).item()
    return array[0].item()
