"""The records that stages hand each other, and the vocabulary they share.

``neox/`` (what a checkpoint means) produces :class:`TensorJob` s; ``convert/`` (cast,
statistics, safetensors) consumes them and produces :class:`WrittenRecord` s and
:class:`WrittenFile` s; ``archive/`` turns those into index rows. Every stage imports these
from here, so no stage imports another to learn a record's shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from exporter.dtypes import BY_CODE, DType, as_dtype
from exporter.dtypes import SAFETENSORS_DTYPES as _SAFETENSORS_DTYPES


class TensorKind(StrEnum):
    """What a tensor of the archive is (the index's ``kind`` column)."""

    MODEL = "model"
    MASTER = "master"
    EXP_AVG = "exp_avg"
    EXP_AVG_SQ = "exp_avg_sq"
    BUFFER = "buffer"
    STATE = "state"


#: Every kind, in archive order (the index ``kind`` column takes these values).
KINDS: tuple[str, ...] = tuple(k.value for k in TensorKind)
#: The kinds recovered from ZeRO optimizer partitions, in file order.
OPTIMIZER_KINDS: tuple[str, ...] = tuple(
    k.value for k in (TensorKind.MASTER, TensorKind.EXP_AVG, TensorKind.EXP_AVG_SQ)
)

#: safetensors/src/tensor.rs `Dtype`, as spelled in the header, for each type it holds; and
#: the type of each code.
SAFETENSORS_DTYPES: dict[DType, str] = _SAFETENSORS_DTYPES
TORCH_DTYPES: dict[str, DType] = BY_CODE


def dtype_name(dtype: Any) -> str:
    """The name the index and the files' metadata give ``dtype`` (``float32``, not
    ``torch.float32``)."""
    return str(dtype).removeprefix("torch.")


def element_size(dtype: Any) -> int:
    """Bytes per element of ``dtype`` (a :class:`~exporter.dtypes.DType` or a torch dtype)."""
    return as_dtype(dtype).itemsize


def check_kind(kind: str, where: str) -> str:
    """``kind`` if it is one of :data:`KINDS`; a ValueError naming ``where`` otherwise."""
    if kind not in KINDS:
        raise ValueError(f"{where} must be one of {', '.join(KINDS)}; got {kind!r}")
    return str(kind)


#: A tensor's elements in row-major order: called with ``max_bytes``, yields 1-D numpy arrays
#: of about that many bytes, of the tensor type's :attr:`~exporter.dtypes.DType.numpy` type
#: (the writer also takes CPU torch tensors, from sources made outside this package).
Chunks = Callable[[int], Iterator[np.ndarray]]

#: Memory a chunk source may read its next chunk of ``nbytes`` into: a uint8 array where the
#: writer would otherwise copy that chunk to, or None (read into a new array then).
Place = Callable[[int], np.ndarray | None]


def reads_into(chunks: Callable[..., Iterator[np.ndarray]]) -> Callable[..., Iterator[np.ndarray]]:
    """Mark a ``chunks`` callable as taking ``place=`` (:data:`Place`) after ``max_bytes``.

    What such a source promises: it reads into ``place(n)`` only bytes it yields next, as
    one chunk or as consecutive chunks in order, asks ``place`` again only once every chunk
    read into the last region is yielded, and keeps none of them. The writer can then take a
    yielded chunk where it lies (:meth:`exporter.convert.direct.DirectFile.place`), which saves
    copying every byte once more.
    """
    chunks.reads_into = True  # type: ignore[attr-defined]
    return chunks


def takes_place(chunks: Callable[..., Iterator[np.ndarray]]) -> bool:
    """Whether ``chunks`` was marked with :func:`reads_into` (bound methods included)."""
    return getattr(chunks, "reads_into", False) is True


def chunk_buffer(nbytes: int, place: Place | None) -> np.ndarray:
    """A uint8 array of ``nbytes`` to read a chunk into: from ``place`` where it gives one."""
    found = place(nbytes) if place is not None and nbytes else None
    return found if found is not None else np.empty(nbytes, dtype=np.uint8)


@dataclass
class TensorJob:
    """One tensor to write.

    Attributes:
        name: key in the output file (Hugging Face name for model tensors).
        kind: one of :data:`KINDS`.
        dtype, shape: of the source tensor (a torch dtype is taken as its
            :class:`~exporter.dtypes.DType`).
        chunks: yields the source elements as 1-D arrays of about ``max_bytes`` each
            (:data:`Chunks`).
        neox_name: the source's name (``2.attention.dense.weight``), if any.
        layer: the transformer block index, if any.
    """

    name: str
    kind: str
    dtype: DType
    shape: tuple[int, ...]
    chunks: Chunks
    neox_name: str | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        self.kind = check_kind(self.kind, "TensorJob.kind")
        self.dtype = as_dtype(self.dtype)
        self.shape = tuple(int(n) for n in self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def chunks_of(tensor: Any) -> Chunks:
    """A ``chunks`` callable over an in-memory tensor: a numpy array or a torch tensor."""
    if isinstance(tensor, np.ndarray):
        flat = tensor.reshape(-1)
    else:
        from exporter.dtypes import from_torch

        flat = from_torch(tensor)[0].reshape(-1)

    def gen(max_bytes: int) -> Iterator[np.ndarray]:
        step = max(1, max_bytes // max(1, flat.itemsize))
        for start in range(0, flat.size, step):
            yield flat[start : start + step]

    return gen


@dataclass
class TensorStats:
    """Summary statistics of one tensor (``None`` where undefined, e.g. no finite value, and
    everywhere when statistics were not computed: :data:`NO_STATS`)."""

    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    l2: float | None
    absmax: float | None
    nan_count: int | None
    inf_count: int | None
    zero_count: int | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


#: The statistics of a tensor exported without them (``--no-stats``): every column null.
NO_STATS = TensorStats(None, None, None, None, None, None, None, None, None)
#: The statistic columns of the tensor index, as ``stats`` and ``plot`` name them (the fields
#: of :class:`TensorStats`, in order).
STATISTICS = tuple(field.name for field in fields(TensorStats))


@dataclass
class WrittenRecord:
    """What was written for one tensor: where, its digest (``digest_algorithm``, see
    :mod:`exporter.convert.digest`) and statistics."""

    job: TensorJob
    file: str
    dtype: DType
    begin: int
    end: int
    digest: str
    stats: TensorStats
    digest_algorithm: str = "blake3"


@dataclass(frozen=True)
class WrittenFile:
    """A written file: path (relative, as in :attr:`WrittenRecord.file`), size in bytes and
    sha256 of its whole content."""

    path: str
    size: int
    sha256: str


#: What happened to a step: converted now, found complete, or failed (with a reason).
StepStatus = Literal["done", "skipped", "failed"]


@dataclass
class StepOutcome:
    """What happened to one step of a build (the manifest records it)."""

    step: int
    status: StepStatus
    tensors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    revision: str | None = None
    files: int = 0
    error: str | None = None


@dataclass(frozen=True)
class UploadTarget:
    """Where workers upload step files ahead of the coordinator's commits (a Hub dataset).

    Attributes:
        repo_id: ``ORG/NAME`` of the dataset (the coordinator creates it before any task runs).
        revision: the branch the commits go to.
    """

    repo_id: str
    revision: str = "main"


@dataclass(frozen=True)
class UploadedFile:
    """A step file in the dataset's storage, not yet committed: a commit needs only this."""

    path: str
    sha256: str
    size: int


@dataclass
class StepUpload:
    """What a worker hands the coordinator for one step, the tensors staying on the Hub.

    Attributes:
        outcome: the step's outcome (``failed`` with the reason, or ``done``).
        uploaded: the step's files uploaded to the dataset's storage (tensor files).
        small_files: archive path -> content of the files the commit carries inline (JSON,
            YAML) and of the step's two index shards, which the coordinator writes.
    """

    outcome: StepOutcome
    uploaded: tuple[UploadedFile, ...] = ()
    small_files: dict[str, bytes] | None = None
