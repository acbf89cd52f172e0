"""Pickle-free reading of torch ``.pt`` files.

Example:
    >>> from exporter.torchfile import load_torch_file
    >>> tf = load_torch_file("layer_02-model_00-model_states.pt")  # doctest: +SKIP
    >>> ref = tf.obj["attention.dense.weight"]                       # doctest: +SKIP
    >>> ref.dtype, ref.shape, ref.read().sum()                       # doctest: +SKIP
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile.container import MAX_PICKLE_BYTES, TorchZip
from exporter.torchfile.patched import Remembered
from exporter.torchfile.records import PickledObject, StorageRef, TensorRef
from exporter.torchfile.repeats import REPEATS
from exporter.torchfile.runs import materialize
from exporter.torchfile.tree import iter_tensors, resolve_numpy, to_json
from exporter.torchfile.unpickler import NUMPY_RECORD_GLOBALS, safe_unpickle

__all__ = [
    "PickledObject",
    "StorageRef",
    "TensorRef",
    "TorchFile",
    "iter_tensors",
    "load_torch_file",
    "paused_collector",
    "to_json",
]


@dataclass
class TorchFile:
    """One ``.pt`` file read without executing its pickle.

    Attributes:
        path: the file.
        obj: the root value; tensors are :class:`TensorRef`, unknown objects
            :class:`PickledObject` (and long lists of tensors may be left as
            :class:`~exporter.torchfile.runs.RecordRun` where asked: ``runs``).
        globals: every global the pickle names -> whether the reader knows it.
        encoded: the tree as :mod:`exporter.torchfile.sendable` encodes it, when the file was
            rebuilt from one read before (:mod:`exporter.torchfile.repeats`).
        derived: what a reader of the file's layout derived from the tree ahead of its use,
            kept with it (:func:`exporter.neox.zero.elastic.prepare_file`).
        runs: whether ``obj`` may hold :class:`~exporter.torchfile.runs.RecordRun` s.
    """

    path: Path
    obj: Any
    globals: dict[str, bool]
    encoded: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    runs: bool = field(default=False, repr=False, compare=False)

    def materialize(self) -> Any:
        """The tree, each :class:`~exporter.torchfile.runs.RecordRun` in it made into its list
        (a file loaded with ``runs``)."""
        if self.runs:
            self.obj = materialize(self.obj)
            self.runs = False
        return self.obj

    def tensors(self) -> list[tuple[str, TensorRef]]:
        """Every tensor with its dotted key path.

        Raises:
            CheckpointFormatError: the object tree is too deep or its key paths too long.
        """
        self.materialize()
        try:
            return list(iter_tensors(self.obj))
        except CheckpointFormatError as exc:
            raise CheckpointFormatError(f"{self.path}: {exc}") from exc

    @property
    def unknown_globals(self) -> list[str]:
        return [name for name, known in self.globals.items() if not known]


@contextmanager
def paused_collector(keep: bool = False) -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block (nested blocks are fine).

    Reading checkpoints builds only new, referenced objects, and no cycles: a ZeRO file of
    many comm intervals makes hundreds of thousands (tensor records, their shapes, the dicts
    holding them), and every collection they trigger walks every object alive, the records
    of the files read before included. Measured on eight 36,000-tensor optimizer files:
    planning took 8.9 s with the collector running, 5.1 s without.

    ``keep``: what the block made lives on (a checkpoint's plan, until its files are written):
    the outermost block moves every object alive out of the collector's reach
    (:func:`gc.freeze`) when it ends, else the first collection after it walks them all
    (0.3 s for the 2.2 M objects of a many-interval plan). The caller undoes it with
    :func:`gc.unfreeze` once they are dropped (objects freed meanwhile are freed as ever).
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            if keep:
                gc.freeze()
            gc.enable()


def load_torch_file(path: str | os.PathLike[str], runs: bool = False) -> TorchFile:
    """Read a torch zip checkpoint's structure; tensor data stays on disk.

    Args:
        path: a file written by ``torch.save`` (torch >= 1.6 zip format).
        runs: a file rebuilt from one read before may hold its long lists of tensor records
            as :class:`~exporter.torchfile.runs.RecordRun` (for a reader that takes their
            columns; :meth:`TorchFile.materialize` makes them lists).

    Inside :func:`~exporter.torchfile.repeats.alike_files`, a file whose pickle is the one
    read just before, or that one with numbers of tensor records changed, is rebuilt from
    that one's records.

    Returns:
        The file's object tree with tensors as :class:`TensorRef`.

    Raises:
        CheckpointFormatError: not a readable torch checkpoint (message names the file).
        UnsafePickleError: the pickle asks for something the reader refuses.
    """
    zip_ = TorchZip(path)
    byteorder = zip_.byteorder()
    if byteorder != "little":
        raise CheckpointFormatError(f"{zip_.path}: {byteorder}-endian checkpoints are not supported")
    data = zip_.read_member("data.pkl", MAX_PICKLE_BYTES)
    with paused_collector():
        rebuilt = REPEATS.rebuild(data, zip_, runs)
    if rebuilt is not None:
        obj, globals_, encoded = rebuilt
        return TorchFile(zip_.path, obj, globals_, encoded, runs=runs)
    keep = REPEATS.wants(data)
    try:
        with paused_collector(), zip_.open():
            result = safe_unpickle(data, zip_, keep)
            obj = result.obj
            if NUMPY_RECORD_GLOBALS.intersection(result.globals):  # else a walk finds nothing
                obj = resolve_numpy(obj)
    except (CheckpointFormatError, UnsafePickleError) as exc:
        if str(zip_.path) in str(exc):
            raise
        raise type(exc)(f"{zip_.path}: {exc}") from exc
    tf = TorchFile(zip_.path, obj, result.globals)
    if keep:
        patch = None
        if result.opcodes is not None and result.memo is not None and obj is result.obj:
            patch = Remembered(data, result.opcodes, result.memo)
        REPEATS.remember(data, tf, zip_, patch)
    return tf
