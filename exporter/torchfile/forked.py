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
called), with every tuple and every non-plain value tagged, and the tensor records as plain
tuples of the numbers the child checked (:mod:`exporter.torchfile.sendable`); this process
rebuilds the records without reading the pickle again. Files whose trees hold anything
else, and every error, are read here instead, so results and messages are those of
:func:`load_torch_file`.

A child is forked only from a process running one thread (a fork copies no other thread, and
a lock another thread held would stay locked in the child).
"""

from __future__ import annotations

import gc
import marshal
import os
import signal
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile.sendable import Decoder, Encoder, Unsendable

#: Files one child can share (their indices fill a pipe's 64 KiB buffer at most).
MAX_SHARED = 16_000
_HEADER = struct.Struct("<IQ")  # file index, message size
_INDEX = struct.Struct("<I")
_ERRORS = {"CheckpointFormatError": CheckpointFormatError, "UnsafePickleError": UnsafePickleError}


class ForkedLoads:
    """Torch files shared with a forked child: :meth:`claim` says which process reads one,
    :meth:`get` waits for one the child read.

    Create with :meth:`start` (None where no child can be forked); call :meth:`close` when done.
    """

    def __init__(self, pid: int, channel: socket.socket, claims: int, paths: list[Path]) -> None:
        self._pid = pid
        self._paths = paths
        self._index = {path: i for i, path in reversed(list(enumerate(paths)))}
        self._claims = claims
        self._mine: set[int] = set()
        self._last = -1  # the last index this process took
        self._messages: dict[int, bytearray] = {}
        self._ended = False
        self._ready = threading.Condition()
        self._reader = threading.Thread(target=self._drain, args=(channel,), daemon=True,
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
        here, there = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            here.close()
            _child(paths, claims_read, there)
        there.close()
        return cls(pid, here, claims_read, paths)

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

    def _drain(self, channel: socket.socket) -> None:
        # Receives each message whole as the child sends it, so the child never waits for
        # this process. A socket, not a pipe: a pipe passes 64 KiB a read, and this thread
        # had to take the GIL back from the reading thread after each (up to the switch
        # interval, 5 ms, each time: 0.1-0.2 s per file of tens of thousands of tensors, the
        # child waiting), where MSG_WAITALL receives a whole message in one call.
        with channel:
            while True:
                try:
                    header = _receive(channel, _HEADER.size)
                    if header is None:
                        break
                    index, size = _HEADER.unpack(header)
                    body = _receive(channel, size)
                except OSError:  # the child is gone: what it did not send is read here
                    break
                if body is None:
                    break
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
        obj = Decoder(Path(path), refs, storages).decode(encoded)
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


def _receive(channel: socket.socket, size: int) -> bytearray | None:
    """The next ``size`` bytes from ``channel``, or None when it ends before them."""
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        n = channel.recv_into(view[got:], size - got, socket.MSG_WAITALL)
        if n == 0:
            return None
        got += n
    return data


def _read_index(fd: int) -> int | None:
    """The next index of the claims pipe, or None when all are taken."""
    data = os.read(fd, _INDEX.size)
    return _INDEX.unpack(data)[0] if len(data) == _INDEX.size else None


def _child(paths: list[Path], claims: int, channel: socket.socket) -> None:
    """Read each file it claims and send it; exits the process without returning."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # The child makes no cycles and exits when done: a collection would only walk every
        # object of the parent's heap and the trees read (measured: 0.22 s against 0.05 s to
        # encode a file of 36,000 tensors).
        gc.disable()
        from exporter.torchfile import load_torch_file

        with channel:
            while (index := _read_index(claims)) is not None:
                try:
                    tf = load_torch_file(paths[index])
                    message: tuple[Any, ...] = ("ok", *Encoder().encode_file(tf))
                except (CheckpointFormatError, UnsafePickleError) as exc:
                    message = ("error", type(exc).__name__, str(exc))
                except (Unsendable, RecursionError):
                    message = ("fallback",)
                body = marshal.dumps(message)
                channel.sendall(_HEADER.pack(index, len(body)) + body)
    except BaseException:  # noqa: BLE001 - the parent reads what the child could not send
        code = 1
    finally:
        os._exit(code)
