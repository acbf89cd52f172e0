"""Stream tensors into safetensors files: read chunk -> cast -> statistics + sha256 -> write.

Each output tensor is a :class:`TensorJob` that knows its shape and dtype up front and
yields its elements as 1-D chunks in row-major order. Memory is bounded by one chunk for
tensors read straight from a file and by one tensor for those that must be assembled
(tensor-parallel merges).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.convert.safetensors_writer import SafetensorsWriter, TensorSpec
from exporter.convert.stats import StatsAccumulator, TensorStats
from exporter.errors import ExporterError

CHUNK_BYTES = 32 << 20
KINDS = ("model", "master", "exp_avg", "exp_avg_sq", "buffer", "state")


@dataclass
class TensorJob:
    """One tensor to write.

    Attributes:
        name: key in the output file (Hugging Face name for model tensors).
        kind: one of ``KINDS``.
        dtype, shape: of the source tensor.
        chunks: yields the source elements as 1-D tensors of about ``max_bytes`` each.
        neox_name: the source's name (``2.attention.dense.weight``), if any.
        layer: the transformer block index, if any.
    """

    name: str
    kind: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[int], Iterator[torch.Tensor]]
    neox_name: str | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TensorJob.kind must be one of {KINDS}, got {self.kind!r}")
        self.shape = tuple(int(n) for n in self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def chunks_of(tensor: torch.Tensor) -> Callable[[int], Iterator[torch.Tensor]]:
    """A ``chunks`` callable over an in-memory tensor."""

    def gen(max_bytes: int) -> Iterator[torch.Tensor]:
        flat = tensor.reshape(-1)
        step = max(1, max_bytes // max(1, flat.element_size()))
        for start in range(0, flat.numel(), step):
            yield flat[start : start + step]

    return gen


@dataclass
class WrittenRecord:
    """What was written for one tensor: where, its hash and statistics."""

    job: TensorJob
    file: str
    dtype: torch.dtype
    begin: int
    end: int
    sha256: str
    stats: TensorStats


@dataclass
class Converter:
    """Casting and statistics settings shared by every file of an export.

    Attributes:
        dtype: output dtype for floating tensors of kind ``model`` (None keeps the source's).
        device: ``cpu`` or ``cuda``: where casts and statistics run.
        chunk_bytes: read size.
    """

    dtype: torch.dtype | None = None
    device: str = "cpu"
    chunk_bytes: int = CHUNK_BYTES
    progress: Callable[[int], None] | None = field(default=None, repr=False)

    def output_dtype(self, job: TensorJob) -> torch.dtype:
        if self.dtype is not None and job.kind == "model" and job.dtype.is_floating_point:
            return self.dtype
        return job.dtype

    def write_file(
        self,
        path: Path,
        jobs: Sequence[TensorJob],
        root: Path,
        metadata: dict[str, str] | None = None,
    ) -> list[WrittenRecord]:
        """Write ``jobs`` into the safetensors file ``path``; ``root`` makes the recorded path relative."""
        specs = [TensorSpec(j.name, self.output_dtype(j), j.shape) for j in jobs]
        records: list[WrittenRecord] = []
        rel = str(Path(path).relative_to(root)) if root else str(path)
        with SafetensorsWriter(Path(path), specs, metadata or {"format": "pt"}) as writer:
            for job, spec in zip(jobs, specs, strict=True):
                digest = hashlib.sha256()
                stats = StatsAccumulator()
                seen = 0
                for chunk in job.chunks(self.chunk_bytes):
                    out = self._cast(chunk, spec.dtype)
                    stats.update(out)
                    raw = _bytes_of(out)
                    digest.update(raw)
                    writer.write(job.name, raw)
                    seen += chunk.numel()
                    if self.progress is not None:
                        self.progress(chunk.numel() * chunk.element_size())
                if seen != job.numel:
                    raise ExporterError(
                        f"{job.name}: source yielded {seen} elements, shape {job.shape} "
                        f"needs {job.numel}"
                    )
                placed = writer.placed[-1] if writer.placed else None
                if placed is None or placed.name != job.name:
                    placed = next(p for p in writer.placed if p.name == job.name)
                records.append(
                    WrittenRecord(
                        job, rel, spec.dtype, placed.begin, placed.end, digest.hexdigest(),
                        stats.result(),
                    )
                )
        return records

    def _cast(self, chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.device != "cpu":
            return chunk.to(self.device, non_blocking=True).to(dtype)
        return chunk.to(dtype) if chunk.dtype != dtype else chunk


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    host = tensor.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    return memoryview(host.contiguous().view(torch.uint8).numpy()).cast("B")
