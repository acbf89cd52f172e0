"""Reading torch files in a forked child process too: a second core for many pickles.

Why: reading a pickle holds the GIL (the C unpickler calls back into Python for every tensor),
so threads cannot share the work. A ZeRO checkpoint written with a small
``reduce_bucket_size`` has a pickle of tens of thousands of tensors per partition file, eight
files or more per step: measured on the 2-core machine, 0.36 s per file, 2.9 s per step, on
one core while the other waits. A child forked from this process (torch and the reader
already imported: no start-up) reads files while this process reads others.

Who reads which file is decided as they go: the files' indices wait in a pipe, in the order
this process needs them, and each process takes the next one when it is free (a read of 4
bytes from a pipe takes them whole). The child never waits; this process, which also writes
the model's files meanwhile, reads fewer files when it is slower.

Why by hand: :mod:`multiprocessing` returns results as pickles, and this package unpickles
nothing that a checkpoint's content went into. The child sends each file's object tree as
:mod:`marshal` data (which builds only plain values: no class is looked up, nothing is
called), with every tuple and every non-plain value tagged (:func:`_encode`), and the tensor
records as plain tuples of the numbers the child checked; this process rebuilds the records
without reading the pickle again. Files whose trees hold anything else, and every error, are
read here instead, so results and messages are those of :func:`load_torch_file`.

A child is forked only from a process running one thread (a fork copies no other thread, and
a lock another thread held would stay locked in the child).
"""

from __future__ import annotations

import gc
import marshal
import os
import signal
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile.records import PickledObject, StorageRef, TensorRef, pickled_class

#: Nodes one file's tree may have to be sent (shared values count once per reference).
MAX_NODES = 5_000_000
#: Files one child can share (their indices fill a pipe's 64 KiB buffer at most).
MAX_SHARED = 16_000
_HEADER = struct.Struct("<IQ")  # file index, message size
_INDEX = struct.Struct("<I")
_ERRORS = {"CheckpointFormatError": CheckpointFormatError, "UnsafePickleError": UnsafePickleError}
_REFS, _STRS = {TensorRef}, {str}
_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_DTYPE_NAMES = {d: name for name, d in _DTYPES.items()}  # str(dtype) costs a microsecond


class _Unsendable(Exception):
    """A value the child does not send: this process reads the file itself."""


class ForkedLoads:
    """Torch files shared with a forked child: :meth:`claim` says which process reads one,
    :meth:`get` waits for one the child read.

    Create with :meth:`start` (None where no child can be forked); call :meth:`close` when done.
    """

    def __init__(self, pid: int, fd: int, claims: int, paths: list[Path]) -> None:
        self._pid = pid
        self._paths = paths
        self._index = {path: i for i, path in reversed(list(enumerate(paths)))}
        self._claims = claims
        self._mine: set[int] = set()
        self._last = -1  # the last index this process took
        self._messages: dict[int, bytes] = {}
        self._ended = False
        self._ready = threading.Condition()
        self._reader = threading.Thread(target=self._drain, args=(fd,), daemon=True,
                                        name="forked-loads")
        self._reader.start()

    @classmethod
    def start(cls, paths: list[Any]) -> ForkedLoads | None:
        """Fork a child that reads ``paths`` (in this order) as it claims them."""
        if not paths or not hasattr(os, "fork") or threading.active_count() != 1:
            return None
        claims_read, claims_write = os.pipe()
        os.set_blocking(claims_write, False)
        try:  # as many as the pipe holds (64 KiB on Linux): the rest are read here
            written = os.write(claims_write, b"".join(
                _INDEX.pack(i) for i in range(min(len(paths), MAX_SHARED))))
        except BlockingIOError:
            written = 0
        os.close(claims_write)  # both processes see the end once every index is taken
        paths = [Path(p) for p in paths][: written // _INDEX.size]
        if not paths:
            os.close(claims_read)
            return None
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_end)
            _child(paths, claims_read, write_end)
        os.close(write_end)
        return cls(pid, read_end, claims_read, paths)

    @property
    def paths(self) -> list[Path]:
        return list(self._paths)

    def claim(self, path: Any) -> bool:
        """Whether this process reads ``path`` (else the child does: :meth:`get` it).

        Ask in the order the paths were given: indices are taken in that order, so an index
        below the last one this process took was taken by the child.
        """
        index = self._index.get(Path(path))
        if index is None or index in self._mine:
            return True
        if index < self._last or self._claims < 0:
            return False
        got = _read_index(self._claims)
        if got is None:  # every index is taken, this one by the child
            os.close(self._claims)
            self._claims = -1
            return False
        self._mine.add(got)
        self._last = got
        return got == index

    def _drain(self, fd: int) -> None:
        # Reads the pipe as the child writes, so the child never waits for this process.
        with os.fdopen(fd, "rb") as pipe:
            while True:
                header = pipe.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    break
                index, size = _HEADER.unpack(header)
                body = pipe.read(size)
                with self._ready:
                    self._messages[index] = body
                    self._ready.notify_all()
        with self._ready:
            self._ended = True  # the child is done (or died)
            self._ready.notify_all()

    def get(self, path: Any) -> Any:
        """The :class:`~exporter.torchfile.TorchFile` of ``path`` as the child read it, or None
        when this process should read it (it took it, the child could not send it, or failed)."""
        from exporter.torchfile import TorchFile

        index = self._index.get(Path(path))
        if index is None or index in self._mine:
            return None
        with self._ready:
            self._ready.wait_for(lambda: index in self._messages or self._ended)
            body = self._messages.pop(index, None)
        if body is None:
            return None
        message = marshal.loads(body)
        if message[0] == "error":
            raise _ERRORS[message[1]](message[2])
        if message[0] != "ok":
            return None
        _, encoded, refs, storages, globals_ = message
        obj = _Decoder(Path(path), refs, storages).decode(encoded)
        return TorchFile(Path(path), obj, globals_)

    def wait_ended(self) -> None:
        """Wait until the child has sent every file it took (or ended otherwise)."""
        with self._ready:
            self._ready.wait_for(lambda: self._ended)

    def close(self) -> None:
        """Stop the child if it still runs, and reap it."""
        try:
            os.kill(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self._pid, 0)
        except ChildProcessError:
            pass
        self._reader.join(timeout=5)
        if self._claims >= 0:
            os.close(self._claims)
            self._claims = -1


def _read_index(fd: int) -> int | None:
    """The next index of the claims pipe, or None when all are taken."""
    data = os.read(fd, _INDEX.size)
    return _INDEX.unpack(data)[0] if len(data) == _INDEX.size else None


def _child(paths: list[Path], claims: int, fd: int) -> None:
    """Read each file it claims and send it; exits the process without returning."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # The child makes no cycles and exits when done: a collection would only walk every
        # object of the parent's heap and the trees read (measured: 0.22 s against 0.05 s to
        # encode a file of 36,000 tensors).
        gc.disable()
        from exporter.torchfile import load_torch_file

        with os.fdopen(fd, "wb") as pipe:
            while (index := _read_index(claims)) is not None:
                try:
                    tf = load_torch_file(paths[index])
                    message: tuple[Any, ...] = ("ok", *_Encoder().encode_file(tf))
                except (CheckpointFormatError, UnsafePickleError) as exc:
                    message = ("error", type(exc).__name__, str(exc))
                except (_Unsendable, RecursionError):
                    message = ("fallback",)
                body = marshal.dumps(message)
                pipe.write(_HEADER.pack(index, len(body)) + body)
                pipe.flush()
    except BaseException:  # noqa: BLE001 - the parent reads what the child could not send
        code = 1
    finally:
        os._exit(code)


class _Encoder:
    def __init__(self) -> None:
        self.refs: list[tuple[Any, ...]] = []
        self.ref_index: dict[int, int] = {}
        self.storages: list[tuple[Any, ...]] = []
        self.storage_index: dict[int, int] = {}
        self.left = MAX_NODES
        self.active: set[int] = set()

    def encode_file(self, tf: Any) -> tuple[Any, ...]:
        return self.encode(tf.obj), self.refs, self.storages, dict(tf.globals)

    def encode(self, value: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise _Unsendable
        kind = type(value)
        if kind is TensorRef:
            return ("T", self._ref(value))
        if value is None or kind in (bool, int, float, str, bytes, complex):
            return value
        if (kind is list or kind is dict) and value and set(map(type, value.values() if kind
                                                              is dict else value)) == _REFS:
            # Lists and str-keyed dicts of tensors only (the sub-partitions and the Adam
            # moments of a ZeRO file, tens of thousands): one node, rebuilt with C-level maps.
            if kind is list:
                self.left -= len(value)
                return ("TL", [self._ref(v) for v in value])
            if set(map(type, value)) == _STRS:
                self.left -= len(value)
                return ("TD", list(value), [self._ref(v) for v in value.values()])
        if id(value) in self.active:
            raise _Unsendable  # a cycle
        self.active.add(id(value))
        try:
            if kind is dict:
                return {self.key(k): self.encode(v) for k, v in value.items()}
            if kind is list:
                return [self.encode(v) for v in value]
            if kind is tuple:
                return ("t", tuple(self.encode(v) for v in value))
            if kind is OrderedDict:
                return ("O", [(self.key(k), self.encode(v)) for k, v in value.items()])
            if kind is np.ndarray and value.dtype.kind in "biufc" and not value.dtype.hasobject:
                return ("N", value.dtype.str, value.shape, value.tobytes())
            if kind is torch.dtype:
                return ("D", str(value))
            if isinstance(value, PickledObject):
                d = value.__dict__
                if any(type(k) is not str for k in d["kwargs"]):
                    raise _Unsendable
                return ("P", value.module, value.name, self.encode(d["args"]),
                        self.encode(d["kwargs"]), self.encode(d["state"]),
                        self.encode(d["items"]), [self.encode(e) for e in d["entries"]])
        finally:
            self.active.discard(id(value))
        raise _Unsendable

    def key(self, key: Any) -> Any:
        if type(key) in (str, int):
            return key
        encoded = self.encode(key)
        try:
            hash(encoded)
        except TypeError:
            raise _Unsendable from None
        return encoded

    def _ref(self, ref: TensorRef) -> int:
        index = self.ref_index.get(id(ref))
        if index is None:
            storage = ref.storage
            s_index = self.storage_index.get(id(storage))
            if s_index is None:
                s_index = self.storage_index[id(storage)] = len(self.storages)
                self.storages.append((storage.key, _DTYPE_NAMES[storage.dtype], storage.numel,
                                      storage.location, storage.file_offset))
            index = self.ref_index[id(ref)] = len(self.refs)
            self.refs.append((s_index, ref.offset, ref.shape, ref.stride, ref.requires_grad,
                              ref.numel))
        return index


class _Decoder:
    def __init__(self, path: Path, refs: list[Any], storages: list[Any]) -> None:
        self.path = path
        self.storages = _storages(path, storages)
        self.refs = _tensors(refs, self.storages)
        self.classes: dict[tuple[str, str], type[PickledObject]] = {}

    def decode(self, value: Any) -> Any:
        kind = type(value)
        if kind is list:
            return [self.decode(v) for v in value]
        if kind is dict:
            return {self.decode(k): self.decode(v) for k, v in value.items()}
        if kind is not tuple:
            return value
        tag = value[0]
        if tag == "T":
            return self.refs[value[1]]
        if tag == "TL":
            return list(map(self.refs.__getitem__, value[1]))
        if tag == "TD":
            return dict(zip(value[1], map(self.refs.__getitem__, value[2]), strict=True))
        if tag == "t":
            return tuple(self.decode(v) for v in value[1])
        if tag == "O":
            return OrderedDict((self.decode(k), self.decode(v)) for k, v in value[1])
        if tag == "N":
            return np.frombuffer(value[3], dtype=np.dtype(value[1])).reshape(value[2]).copy()
        if tag == "D":
            return _DTYPES[value[1]]
        if tag == "P":
            _, module, name, args, kwargs, state, items, entries = value
            cls = self.classes.get((module, name))
            if cls is None:
                cls = self.classes[(module, name)] = pickled_class(module, name)
            obj = cls.__new__(cls, *self.decode(args), **self.decode(kwargs))
            obj.__dict__.update(state=self.decode(state), items=self.decode(items),
                                entries=[self.decode(e) for e in entries])
            return obj
        raise CheckpointFormatError(f"{self.path}: unknown record from the reading process")


def _storages(path: Path, rows: list[Any]) -> list[StorageRef]:
    # Loops rather than a call per record: tens of thousands in a ZeRO file of many intervals.
    out = []
    new, dtypes = object.__new__, _DTYPES
    for key, dtype, numel, location, file_offset in rows:
        storage = new(StorageRef)
        storage.path, storage.key, storage.dtype = path, key, dtypes[dtype]
        storage.numel, storage.location, storage.file_offset = numel, location, file_offset
        out.append(storage)
    return out


def _tensors(rows: list[Any], storages: list[StorageRef]) -> list[TensorRef]:
    out = []
    new = object.__new__
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per shape, as the reader keeps
    for storage, offset, shape, stride, requires_grad, numel in rows:
        ref = new(TensorRef)
        ref.storage, ref.offset = storages[storage], offset
        ref.shape, ref.stride = shapes.setdefault(shape, shape), shapes.setdefault(stride, stride)
        ref.requires_grad, ref.numel = requires_grad, numel
        out.append(ref)
    return out
