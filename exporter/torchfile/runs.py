"""A file's tensor records kept as the rows they came as, made into records only when asked.

A file rebuilt from one read before (:mod:`exporter.torchfile.repeats`) or sent by a forked
reader (:mod:`exporter.torchfile.forked`) comes as rows of numbers the reader checked
(:mod:`exporter.torchfile.sendable`'s two tables). A ZeRO partition file of many comm
intervals holds tens of thousands of records in a few long lists, and the plan of its
optimizer state wants only their columns (where each lies, its size, its dtype): making
36,369 tensor and storage records, then taking their columns again, cost 0.03 s a file
against 0.005 s for the columns taken from the rows with numpy.

So a reader that knows them can ask for the tree with each long list of records left as a
:class:`RecordRun` (``load_torch_file(..., runs=True)``): its length known, its columns made
from the rows (:meth:`RecordRun.columns`), a record made one at a time where one is asked for
(a parameter's first segment, a slice read for ``verify``), and the whole list made by
:meth:`RecordRun.records`, the records then those :class:`Rows` made before (one record, one
object, as the reader makes them).
"""

from __future__ import annotations

from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from exporter.dtypes import BY_NAME, DType
from exporter.torchfile.records import PickledObject, StorageRef, TensorRef

#: Each dtype by the name a storage row gives it (``str`` of it).
DTYPES = {str(d): d for d in BY_NAME.values()}
#: Lists of fewer records are made at once: a run costs more than it saves there.
RUN_FROM = 256
_ROW_STORAGE, _ROW_OFFSET, _ROW_SHAPE, _ROW_STRIDE, _ROW_NUMEL = map(itemgetter, (0, 1, 2, 3, 5))
_STORAGE_DTYPE, _STORAGE_OFFSET = itemgetter(1), itemgetter(4)
_LEAVES = {TensorRef, int, float, str, bool, type(None)}


class Rows:
    """One file's record rows: tensor rows ``(storage, offset, shape, stride, requires_grad,
    numel)`` and storage rows ``(key, dtype, numel, location, file_offset)``, each made into
    its record once, when first asked for."""

    def __init__(self, path: Path, refs: list[Any], storages: list[Any]) -> None:
        self.path = path
        self.ref_rows = refs
        self.storage_rows = storages
        self._refs: dict[int, TensorRef] = {}
        self._storages: dict[int, StorageRef] = {}
        self._all: list[TensorRef] | None = None
        self._columns: _Columns | None = None

    def ref(self, index: int) -> TensorRef:
        """Tensor row ``index`` as its record (the same object every time)."""
        if self._all is not None:
            return self._all[index]
        ref = self._refs.get(index)
        if ref is None:
            storage, offset, shape, stride, requires_grad, numel = self.ref_rows[index]
            ref = self._refs[index] = _tensor(self._storage(storage), offset, shape, stride,
                                              requires_grad, numel)
        return ref

    def _storage(self, index: int) -> StorageRef:
        storage = self._storages.get(index)
        if storage is None:
            key, dtype, numel, location, file_offset = self.storage_rows[index]
            storage = self._storages[index] = StorageRef.at(self.path, key, DTYPES[dtype], numel,
                                                            location, file_offset)
        return storage

    def all(self) -> list[TensorRef]:
        """Every tensor row's record, in row order (with loops: tens of thousands in a ZeRO
        file of many comm intervals)."""
        if self._all is None:
            storages = _storages(self.path, self.storage_rows, self._storages)
            self._all = _tensors(self.ref_rows, storages, self._refs)
            self._refs.clear()
            self._storages.clear()
        return self._all

    def columns(self) -> _Columns:
        if self._columns is None:
            self._columns = _Columns(self.ref_rows, self.storage_rows)
        return self._columns


class _Columns:
    """Every row's numbers as numpy arrays, made once per file with C-level maps."""

    def __init__(self, refs: list[Any], storages: list[Any]) -> None:
        n = len(refs)
        self.storage = np.fromiter(map(_ROW_STORAGE, refs), np.int64, n)
        self.offset = np.fromiter(map(_ROW_OFFSET, refs), np.int64, n)
        self.numel = np.fromiter(map(_ROW_NUMEL, refs), np.int64, n)
        self.file_offset = np.fromiter(map(_STORAGE_OFFSET, storages), np.int64, len(storages))
        names = list(map(_STORAGE_DTYPE, storages))
        seen = list(dict.fromkeys(names))
        self.dtypes: list[DType] = [DTYPES[name] for name in seen]
        if len(seen) == 1:
            self.dtype = np.zeros(len(storages), dtype=np.int32)
        else:
            where = {name: i for i, name in enumerate(seen)}
            self.dtype = np.fromiter(map(where.__getitem__, names), np.int32, len(names))
        # Whether every record is 1-D and contiguous (or of at most one element): decided on
        # the few distinct shapes and strides the rows share.
        strides = set(map(_ROW_STRIDE, refs))
        shapes = set(map(_ROW_SHAPE, refs))
        self.all_flat = all(len(shape) == 1 for shape in shapes) and (
            strides <= {(1,)} or all(_flat(row) for row in refs))
        self.refs = refs

    def flat(self, index: np.ndarray) -> bool:
        """Whether every row at ``index`` is a flat partition (1-D, contiguous)."""
        return self.all_flat or all(_flat(self.refs[i]) for i in index.tolist())


def _flat(row: tuple[Any, ...]) -> bool:
    shape, stride = row[2], row[3]
    return len(shape) == 1 and (stride[0] == 1 or shape[0] <= 1)


class RecordRun:
    """A list of tensor records, or of dicts of one key set holding them, not made yet:
    ``indices`` are tensor rows of ``rows`` in list order (dict by dict, each in ``keys``
    order, for a list of dicts)."""

    __slots__ = ("rows", "indices", "keys")

    def __init__(self, rows: Rows, indices: range | list[int], keys: list[str] | None = None):
        self.rows = rows
        self.indices = indices
        self.keys = keys

    def __len__(self) -> int:
        return len(self.indices) // len(self.keys) if self.keys else len(self.indices)

    def __getitem__(self, i: int) -> Any:
        """Item ``i``: one record (or dict of them) made, not the list."""
        if self.keys:
            width = len(self.keys)
            at = range(len(self))[i] * width
            return dict(zip(self.keys, map(self.rows.ref, self.indices[at : at + width]),
                            strict=True))
        return self.rows.ref(self.indices[i])

    def records(self) -> list[Any]:
        """The list itself: every record made (or found made)."""
        refs = self.rows.all()
        if type(self.indices) is range and self.indices.step == 1:
            made = refs[self.indices.start : self.indices.stop]
        else:
            made = list(map(refs.__getitem__, self.indices))
        if not self.keys:
            return made
        width = len(self.keys)
        return [dict(zip(self.keys, made[i : i + width], strict=True))
                for i in range(0, len(made), width)]

    def under(self, key: str) -> RecordRun | None:
        """The records under ``key`` of each dict, as a run of records (None if the dicts
        have no such key)."""
        if not self.keys or key not in self.keys:
            return None
        at, width = self.keys.index(key), len(self.keys)
        return RecordRun(self.rows, self.indices[at::width])

    def marks(self) -> np.ndarray:
        """Per item, the numbers its record shows but its place: the dtype (this file's index
        of it) and element count of its record, or of each of its dict's records in key order
        (for runs of the items a rendering shows alike: :mod:`exporter.neox.zero.render`)."""
        c = self.rows.columns()
        index = self._index()
        pairs = np.stack([c.dtype[c.storage[index]], c.numel[index]], axis=1)
        return pairs.reshape(len(self), -1)

    def _index(self) -> np.ndarray:
        if type(self.indices) is range:
            return np.arange(self.indices.start, self.indices.stop, self.indices.step)
        return np.array(self.indices, dtype=np.int64)

    def columns(self) -> tuple[Any, ...] | None:
        """The columns :func:`exporter.neox.zero.gather.columns_of` gives of the records,
        taken from the rows; None for a list of dicts, or if a record is not flat."""
        if self.keys:
            return None
        c = self.rows.columns()
        index = self._index()
        if not c.flat(index):
            return None
        storage = c.storage[index]
        path = self.rows.path
        return (np.full(len(index), id(path), dtype=np.int64), c.dtype[storage], c.offset[index],
                c.file_offset[storage], {id(path): path}, list(c.dtypes), c.numel[index])


def materialize(value: Any, keep: set[int] = frozenset(), seen: dict[int, Any] | None = None
                ) -> Any:
    """``value`` with every :class:`RecordRun` inside it made into its list (in place in dicts
    and lists; the new root is returned), but those whose ids are in ``keep``."""
    seen = {} if seen is None else seen
    if type(value) is RecordRun:
        return value if id(value) in keep else value.records()
    if id(value) in seen:
        return seen[id(value)]
    if isinstance(value, dict):
        seen[id(value)] = value
        for key, item in value.items():
            new = materialize(item, keep, seen)
            if new is not item:
                value[key] = new
    elif isinstance(value, list):
        seen[id(value)] = value
        if set(map(type, value)) <= _LEAVES:  # a list of records read in full: nothing to make
            return value
        value[:] = [materialize(item, keep, seen) for item in value]
    elif isinstance(value, PickledObject):
        seen[id(value)] = value
        fields = value.__dict__
        for name in ("args", "kwargs", "state", "items", "entries"):
            fields[name] = materialize(fields[name], keep, seen)
    elif isinstance(value, tuple):
        new_tuple = tuple(materialize(item, keep, seen) for item in value)
        seen[id(value)] = value if all(
            a is b for a, b in zip(new_tuple, value, strict=True)) else new_tuple
        return seen[id(value)]
    return value


def _storages(path: Path, rows: list[Any], made: dict[int, StorageRef]) -> list[StorageRef]:
    out = []
    new, dtypes = object.__new__, DTYPES
    for key, dtype, numel, location, file_offset in rows:
        storage = new(StorageRef)
        storage.path, storage.key, storage.dtype = path, key, dtypes[dtype]
        storage.numel, storage.location, storage.file_offset = numel, location, file_offset
        out.append(storage)
    for index, storage in made.items():
        out[index] = storage
    return out


def _tensors(rows: list[Any], storages: list[StorageRef], made: dict[int, TensorRef]) -> list[TensorRef]:
    out = []
    new = object.__new__
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per shape, as the reader keeps
    for storage, offset, shape, stride, requires_grad, numel in rows:
        ref = new(TensorRef)
        ref.storage, ref.offset = storages[storage], offset
        ref.shape, ref.stride = shapes.setdefault(shape, shape), shapes.setdefault(stride, stride)
        ref.requires_grad, ref.numel = requires_grad, numel
        out.append(ref)
    for index, ref in made.items():
        out[index] = ref
    return out


def _tensor(storage: StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
            requires_grad: bool, numel: int) -> TensorRef:
    ref = object.__new__(TensorRef)
    ref.storage, ref.offset, ref.shape, ref.stride = storage, offset, shape, stride
    ref.requires_grad, ref.numel = requires_grad, numel
    return ref
