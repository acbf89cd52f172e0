"""Inert values the safe unpickler produces in place of live objects.

A tensor becomes a :class:`TensorRef` (where its bytes are, not the bytes); any global the
reader does not turn into a plain value becomes a :class:`PickledObject` that remembers its
module, name, constructor arguments and state, so it can be written out as JSON and
inspected. None of these classes lets a pickle change it after construction: BUILD opcodes
on them either record state (``PickledObject``) or fail (``TensorRef``).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.dtypes import DType, to_torch
from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.records import Place, chunk_buffer, reads_into

if TYPE_CHECKING:
    from exporter.torchfile.container import TorchZip

_MAX_DIMS = 64
#: Sizes, strides, offsets and element counts are int64 in torch (c10 ``int64_t``); a pickle
#: can hold integers of any width, and arithmetic on megabyte-wide ones takes minutes.
MAX_INT64 = 2**63 - 1


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` of a value from a pickle, bounded in time and length.

    ``repr`` of a pickled value can take exponential time (a tuple holding the same tuple
    twice, nested sixty times, prints 2**60 leaves) or fail (integers over 4300 digits), so
    error messages use this: at most three levels, four items per container, ``limit`` chars.
    """

    def walk(v: Any, depth: int) -> str:
        if isinstance(v, (str, bytes, bytearray)):
            return repr(v[:limit]) + ("..." if len(v) > limit else "")
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
            return f"<int of {v.bit_length()} bits>"
        if isinstance(v, (list, tuple, set, frozenset, dict)):
            if depth >= 3:
                return f"<{type(v).__name__} of {len(v)}>"
            items = v.items() if isinstance(v, dict) else v
            shown = [
                f"{walk(i[0], depth + 1)}: {walk(i[1], depth + 1)}" if isinstance(v, dict)
                else walk(i, depth + 1)
                for i in itertools.islice(items, 4)
            ]
            more = ", ..." if len(v) > 4 else ""
            return f"{type(v).__name__}[{', '.join(shown)}{more}]"
        if v is None or isinstance(v, (bool, int, float, complex, DType, PickledObject,
                                       StorageRef, TensorRef)):
            return repr(v)
        if isinstance(v, type) and issubclass(v, PickledObject):
            return f"<global {v.module}.{v.name}>"
        return f"<{type(v).__name__}>"

    text = walk(value, 0)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_exact(fd: int, view: memoryview, offset: int, path: os.PathLike[str] | str) -> None:
    """Fill ``view`` with the bytes at ``offset`` of open file ``fd``.

    ``os.preadv`` reads straight into the caller's buffer: one copy out of the page cache, where
    ``os.pread`` returns a new ``bytes`` that must be copied again into a writable array.
    """
    done, size = 0, view.nbytes
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointFormatError(f"{path}: short read at {offset + done} (file truncated?)")
        done += n


def read_tensor(path: os.PathLike[str] | str, offset: int, nbytes: int,
                dtype: DType) -> np.ndarray:
    """``nbytes`` bytes at ``offset`` of ``path`` as a new 1-D array of ``dtype``'s
    :attr:`~exporter.dtypes.DType.numpy` type."""
    out = np.empty(nbytes, dtype=np.uint8)
    if nbytes:
        with open(path, "rb", buffering=0) as fh:
            read_exact(fh.fileno(), memoryview(out), offset, path)
    return out.view(dtype.numpy)


class StorageRef:
    """One storage of a torch zip file: ``numel`` elements of ``dtype`` at a file offset."""

    # The file's path, not its TorchZip: the container's member tables (tens of thousands of
    # names for a ZeRO file of many comm intervals) are not needed once the pickle is read.
    __slots__ = ("key", "dtype", "numel", "location", "file_offset", "path")

    def __init__(self, zip_: TorchZip, key: str, dtype: DType, numel: int, location: str):
        if not isinstance(numel, int) or isinstance(numel, bool) or not 0 <= numel <= MAX_INT64:
            raise CheckpointFormatError(
                f"{zip_.path}: storage {key!r} has invalid size {short_repr(numel)}"
            )
        data_offset, size = zip_.storage_span(key)
        nbytes = numel * dtype.itemsize
        if size != nbytes:
            raise CheckpointFormatError(
                f"{zip_.path}: storage {key!r} should hold {nbytes} bytes "
                f"({numel} x {dtype}), its member holds {size}"
            )
        self.path = zip_.path
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.location = location
        self.file_offset = data_offset

    @classmethod
    def at(cls, path: Path, key: str, dtype: DType, numel: int, location: str,
           file_offset: int) -> StorageRef:
        """A record of values the caller checked (the reader's path for the storages
        ``torch.save`` writes)."""
        ref = cls.__new__(cls)
        ref.path, ref.key, ref.dtype, ref.numel = path, key, dtype, numel
        ref.location, ref.file_offset = location, file_offset
        return ref

    def __setstate__(self, state: object) -> None:
        raise UnsafePickleError("a pickle tried to modify a storage record")

    def __repr__(self) -> str:
        return f"StorageRef(key={self.key!r}, dtype={self.dtype}, numel={self.numel})"


class TensorRef:
    """A tensor in a torch zip file, described but not read.

    Attributes:
        storage: the storage it views.
        offset: storage offset in elements.
        shape, stride: in elements, as torch records them.
        requires_grad: as pickled.
    """

    __slots__ = ("storage", "offset", "shape", "stride", "requires_grad", "numel")

    def __init__(
        self,
        storage: StorageRef,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        requires_grad: bool = False,
        *_: Any,
    ) -> None:
        # torch/_utils.py _rebuild_tensor_v2(storage, storage_offset, size, stride,
        # requires_grad, backward_hooks, metadata=None): the unpickler calls this directly,
        # and drops the hooks and metadata. Built once per tensor (hundreds of thousands in a
        # ZeRO file of many comm intervals): plain comparisons, messages made on failure,
        # and the 1-D case first.
        if type(storage) is not StorageRef:
            raise CheckpointFormatError("tensor rebuilt from something that is not a storage")
        if (type(shape) is tuple and type(stride) is tuple and len(shape) == 1
                and len(stride) == 1 and type(offset) is int):
            n, step = shape[0], stride[0]
            if not (type(n) is int and type(step) is int and 0 <= n <= MAX_INT64
                    and 0 <= step <= MAX_INT64 and 0 <= offset <= MAX_INT64):
                shape, stride = int_tuple(shape, storage, "shape"), int_tuple(stride, storage, "stride")
                _check_offset(offset, storage)
            numel, last = n, offset + (n - 1) * step
            shape = _SHAPES.get(shape) or _shared(shape)
            stride = _SHAPES.get(stride) or _shared(stride)
        else:
            shape = int_tuple(shape, storage, "shape")
            stride = int_tuple(stride, storage, "stride")
            if len(shape) != len(stride):
                raise CheckpointFormatError(
                    f"{_where(storage)}: shape {shape} and stride {stride} differ in rank"
                )
            _check_offset(offset, storage)
            numel = math.prod(shape)
            last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if numel > 0 and last >= storage.numel:
            raise CheckpointFormatError(
                f"{_where(storage)}: shape {shape} stride {stride} offset {offset} reaches "
                f"element {last}, past the storage's {storage.numel} elements"
            )
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride
        self.requires_grad = bool(requires_grad)
        self.numel = numel

    def __setstate__(self, state: object) -> None:
        raise UnsafePickleError("a pickle tried to modify a tensor record")

    def __repr__(self) -> str:
        return f"TensorRef({self.dtype}, shape={list(self.shape)}, storage={self.storage.key!r})"

    @property
    def dtype(self) -> DType:
        return self.storage.dtype

    @property
    def element_size(self) -> int:
        return self.storage.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True

    @property
    def file_offset(self) -> int:
        """Absolute byte offset of the first element in the ``.pt`` file."""
        return self.storage.file_offset + self.offset * self.element_size

    @property
    def path(self) -> os.PathLike[str]:
        return self.storage.path

    def read(self) -> Any:
        """The tensor as an owned, contiguous torch tensor (reads only its bytes; imports
        torch: :meth:`read_array` does not)."""
        return to_torch(self.read_array(), self.dtype)

    def read_array(self) -> np.ndarray:
        """The tensor as an owned, contiguous numpy array of its type's
        :attr:`~exporter.dtypes.DType.numpy` type (reads only its bytes)."""
        dtype = self.dtype
        if self.numel == 0:
            return np.empty(self.shape, dtype=dtype.numpy)
        if self.is_contiguous:
            return read_tensor(self.path, self.file_offset, self.nbytes, dtype).reshape(self.shape)
        span = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        flat = read_tensor(self.path, self.storage.file_offset, (span + 1) * dtype.itemsize, dtype)
        strides = tuple(s * dtype.itemsize for s in self.stride)
        return np.lib.stride_tricks.as_strided(flat[self.offset :], self.shape, strides).copy()

    def read_range(self, start: int, count: int) -> np.ndarray:
        """Flat elements ``[start, start + count)`` in row-major order, as a 1-D array."""
        if start < 0 or count < 0 or start + count > self.numel:
            raise CheckpointFormatError(f"{self.path}: element range outside a tensor of {self.numel}")
        if not self.is_contiguous:
            return self.read_array().reshape(-1)[start : start + count].copy()
        size = self.element_size
        return read_tensor(self.path, self.file_offset + start * size, count * size, self.dtype)

    @reads_into
    def iter_chunks(self, max_bytes: int = 64 << 20, place: Place | None = None,
                    ) -> Iterator[np.ndarray]:
        """The elements in row-major order as 1-D arrays of at most ``max_bytes`` each.

        Contiguous tensors are read piece by piece, so memory stays at one chunk whatever the
        tensor's size; others are read whole first. Each chunk is a new array the bytes were
        read into (:func:`read_exact`), so callers may keep it; or, given ``place``, memory
        from it where it gives some (:func:`exporter.records.reads_into`).
        """
        if not self.is_contiguous:
            yield self.read_array().reshape(-1)
            return
        step = max(1, max_bytes // self.element_size) * self.element_size
        start, end = self.file_offset, self.file_offset + self.nbytes
        with open(self.path, "rb", buffering=0) as fh:
            for pos in range(start, end, step):
                out = chunk_buffer(min(step, end - pos), place)
                read_exact(fh.fileno(), memoryview(out), pos, self.path)
                yield out.view(self.dtype.numpy)


_SHAPES: dict[tuple[int, ...], tuple[int, ...]] = {}
_MAX_SHARED_SHAPES = 1 << 16


def _shared(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One tuple object per distinct shape or stride: a ZeRO file of many comm intervals holds
    tens of thousands of partitions of a few sizes, each with its own two tuples once read."""
    if len(shape) > 2:
        return shape
    found = _SHAPES.get(shape)
    if found is None:
        if len(_SHAPES) >= _MAX_SHARED_SHAPES:
            return shape
        _SHAPES[shape] = found = shape
    return found


def _check_offset(offset: Any, storage: StorageRef) -> None:
    if type(offset) is not int or not 0 <= offset <= MAX_INT64:
        raise CheckpointFormatError(f"{_where(storage)}: invalid storage offset {short_repr(offset)}")


def _where(storage: StorageRef) -> str:
    return f"{storage.path}: tensor on storage {storage.key!r}"


def int_tuple(value: Any, where: StorageRef | str, what: str) -> tuple[int, ...]:
    """``value`` as a tuple of int64-sized non-negative ints (``bool`` is not an int here)."""
    if type(value) is tuple and len(value) == 1:
        item = value[0]
        if type(item) is int and 0 <= item <= MAX_INT64:
            return _shared(value)
    elif isinstance(value, (tuple, list)) and len(value) <= _MAX_DIMS:
        for item in value:
            if type(item) is not int or not 0 <= item <= MAX_INT64:
                break
        else:
            return _shared(tuple(value))
    place = _where(where) if isinstance(where, StorageRef) else where
    raise CheckpointFormatError(f"{place}: invalid {what} {short_repr(value)}")


class PickledObject:
    """An object of a class the reader does not build: its recipe, kept inert.

    Attributes:
        module, name: the global the pickle named.
        args: constructor arguments (REDUCE / NEWOBJ / INST).
        kwargs: keyword arguments (NEWOBJ_EX).
        state: what BUILD passed (usually the instance ``__dict__``).
        items: what APPEND(S) added; ``entries``: what SETITEM(S) set.
    """

    module: str = ""
    name: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[], entries=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments were recorded by ``__new__``; nothing runs here."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def append(self, item: Any) -> None:
        self.__dict__["items"].append(item)

    def extend(self, items: Any) -> None:
        if not isinstance(items, (list, tuple)):
            raise UnsafePickleError("APPENDS on a pickled object with a non-list")
        self.__dict__["items"].extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["entries"].append((key, value))

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"


def pickled_class(module: str, name: str) -> type[PickledObject]:
    """A stand-in class for the global ``module.name``: instances only record their recipe."""
    return type("PickledObject", (PickledObject,), {"module": module, "name": name})
