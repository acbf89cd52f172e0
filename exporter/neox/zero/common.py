"""Shared pieces of the ZeRO readers: parameter slices of partition files, and their jobs.

A ZeRO partition file holds, per param group, one flat fp32 tensor (the rank's slice of the
group's flattened parameters) and the Adam moments of the same slice. A parameter is thus a
list of :class:`Segment` s — contiguous element ranges of partition tensors, possibly on
several ranks — and is read segment by segment, never by concatenating whole partitions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from exporter.errors import CheckpointFormatError, LayoutError
from exporter.torchfile import TensorRef


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, start + count)`` of a 1-D partition tensor."""

    ref: TensorRef
    start: int
    count: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.count < 0 or self.start + self.count > self.ref.numel:
            raise CheckpointFormatError(
                f"{self.ref.path}: slice [{self.start}, {self.start + self.count}) lies outside "
                f"a partition of {self.ref.numel} elements"
            )

    def read(self) -> torch.Tensor:
        size = self.ref.element_size
        raw = self.ref.storage.zip.read(self.ref.file_offset + self.start * size, self.count * size)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(self.ref.dtype)


@dataclass
class ParamSlices:
    """One parameter of one model-parallel unit: its shape and where each kind lies."""

    name: str
    shape: tuple[int, ...]
    group: int
    segments: dict[str, list[Segment]] = field(default_factory=dict)

    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, kind: str) -> torch.Tensor:
        parts = [s.read() for s in self.segments[kind]]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return flat.reshape(self.shape)

    def read_range(self, kind: str, start: int, count: int) -> torch.Tensor:
        """Flat elements ``[start, start + count)`` of one kind, reading only those bytes."""
        spans = [(seg.ref, seg.start, seg.count) for seg in self.segments[kind]]
        parts = [seg.read() for seg in covering(spans, start, count, self.name)]
        if not parts:
            return torch.empty(0, dtype=torch.float32)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def chunks(self, kind: str) -> Callable[[int], Iterator[torch.Tensor]]:
        segments = self.segments[kind]

        def gen(max_bytes: int) -> Iterator[torch.Tensor]:
            for seg in segments:
                step = max(1, max_bytes // seg.ref.element_size)
                for start in range(seg.start, seg.start + seg.count, step):
                    count = min(step, seg.start + seg.count - start)
                    yield Segment(seg.ref, start, count).read()

        return gen


def flat_partition(ref: Any, where: str) -> TensorRef:
    """Check that ``ref`` is a 1-D contiguous tensor (a flat ZeRO partition)."""
    if not isinstance(ref, TensorRef):
        raise LayoutError(f"{where}: expected a flat partition tensor, found {type(ref).__name__}")
    if len(ref.shape) != 1 or not ref.is_contiguous:
        raise LayoutError(f"{where}: partition tensor has shape {list(ref.shape)}, expected 1-D")
    return ref


def covering(spans: list[tuple[TensorRef, int, int]], begin: int, count: int,
             what: str) -> list[Segment]:
    """The segments holding elements ``[begin, begin + count)`` of a flat sequence laid out as
    ``spans``, each ``(ref, start, size)``: ``size`` elements of ``ref`` from ``start`` on.

    The one slicing routine of the ZeRO readers: a parameter within a group's partitions
    (current DeepSpeed: each rank spans the padded partition size, the last rank's tensor may be
    trimmed; DeeperSpeed elastic: sub-partitions back to back), and a range within a
    parameter's own segments.
    """
    segments = []
    pos, end, base = begin, begin + count, 0
    for ref, start, size in spans:
        if pos >= end:
            break
        if pos < base + size:
            take = min(end, base + size) - pos
            segments.append(Segment(ref, start + pos - base, take))
            pos += take
        base += size
    if pos < end:
        raise LayoutError(f"{what}: elements [{begin}, {end}) run past the last partition "
                          f"({base} elements; partition count mismatch?)")
    return segments


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
        return value.read().reshape(-1)[0].item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None
