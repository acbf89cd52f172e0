"""Reading torch files in a forked child process too: a second core for many pickles.

Why: reading a pickle holds the GIL (the C unpickler calls back into Python for every tensor),
so threads cannot share the work. A ZeRO checkpoint written with a small ``reduce_bucket_size``
has a pickle of tens of thousands of tensors per partition file, eight files or more per step:
measured on the 2-core machine, 0.36 s per file, 2.9 s per step, on one core while the other
waits. A child forked from this process (torch and the reader already imported: no start-up)
reads files while this process reads others.

Who reads which file is decided as they go: the files of a batch (one step's partition files)
have their indices wait in a pipe, in the order this process needs them, and each process
takes the next one when it is free (a read of 4 bytes from a pipe takes them whole). The child
never waits; this process reads fewer files when it is slower, and once it has none left to
read it waits for the child's (:meth:`ForkedLoads.wait_idle`: the core it frees can write).

Why by hand: :mod:`multiprocessing` returns results as pickles, and this package unpickles
nothing that a checkpoint's content went into. The child sends each file's object tree as
:mod:`marshal` data (which builds only plain values: no class is looked up, nothing is called),
with every tuple and every non-plain value tagged, and the tensor records as plain tuples of the
numbers the child checked (:mod:`exporter.torchfile.sendable`); this process rebuilds the
records without reading the pickle again. Files whose trees hold anything else, and every
error, are read here instead, so results and messages are those of :func:`load_torch_file`.

A child is forked only from a process running one thread (a fork copies no other thread, and
a lock another thread held would stay locked in the child). A single export forks one for its
own batch (:meth:`ForkedLoads.start`); a build, whose fetch, upload and progress threads run
while its steps convert, forks one before it starts any (:func:`kept_reader`), and that child
reads every step's batch in turn. It closes every file descriptor it inherited but its two
sockets (a lock, a pipe or a connection of this process stays this process's alone), and ends
when this process closes the reader or exits.
"""

from __future__ import annotations

import contextlib
import gc
import marshal
import os
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile import TorchFile, load_torch_file
from exporter.torchfile.repeats import alike_files, encode_once
from exporter.torchfile.sendable import Decoder, Unsendable

#: Files one batch can share (their indices fill a pipe's 64 KiB buffer at most).
MAX_SHARED = 16_000
#: How long closing a batch waits for the child to finish the file it is reading, after which
#: the child is stopped (a file takes about a second at most; the wait only bounds a fault).
END_WAIT_SECONDS = 60.0
_HEADER = struct.Struct("<IQ")  # file index, message size
_INDEX = struct.Struct("<I")
_END = 0xFFFFFFFF  # the index of the message that ends a batch
_ERRORS = {"CheckpointFormatError": CheckpointFormatError, "UnsafePickleError": UnsafePickleError}


class ForkedReader:
    """A forked child that reads torch files for this process, one batch after another.

    Create with :meth:`fork` (None where no child can be forked), hand it batches with
    :meth:`share`, one at a time; :meth:`close` stops it.
    """

    def __init__(self, pid: int, control: socket.socket, channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel  # the child's files come back here
        self._control = control  # batches go out here
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False

    @classmethod
    def fork(cls) -> ForkedReader | None:
        """Fork the child now, if this process runs one thread."""
        if not hasattr(os, "fork") or threading.active_count() != 1:
            return None
        control, control_there = socket.socketpair()
        channel, channel_there = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            control.close()
            channel.close()
            _serve(control_there, channel_there)
        control_there.close()
        channel_there.close()
        return cls(pid, control, channel)

    @property
    def alive(self) -> bool:
        return not self._closed

    def share(self, paths: list[Any]) -> ForkedLoads | None:
        """Hand the child a batch of ``paths`` to read as it claims them (None when it is gone,
        reading another batch, or no path could be shared)."""
        with self._lock:
            if self._closed or self._busy or not paths:
                return None
            claims_read, claims_write = os.pipe()
            os.set_blocking(claims_write, False)
            try:  # as many as the pipe holds (64 KiB on Linux): the rest are read here
                written = os.write(claims_write, b"".join(
                    _INDEX.pack(i) for i in range(min(len(paths), MAX_SHARED))))
            except BlockingIOError:
                written = 0
            os.close(claims_write)  # both processes see the end once every index is taken
            shared = [Path(p) for p in paths][: written // _INDEX.size]
            if not shared:
                os.close(claims_read)
                return None
            body = marshal.dumps([os.fspath(p) for p in shared])
            try:
                socket.send_fds(self._control, [_HEADER.pack(len(shared), len(body))],
                                [claims_read])
                self._control.sendall(body)
            except OSError:  # the child is gone, or its socket broke: it reads nothing more
                os.close(claims_read)
                self._stop()
                return None
            self._busy = True
        return ForkedLoads(self, claims_read, shared)

    def batch_ended(self, cleanly: bool) -> None:
        """The batch handed out is over; a batch that did not end with the child's end message
        leaves the child in an unknown state, so it is stopped."""
        with self._lock:
            self._busy = False
            if not cleanly:
                self._stop()

    def close(self) -> None:
        """Stop the child and reap it."""
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._control.close()
        self.channel.close()


_kept: ForkedReader | None = None


@contextmanager
def kept_reader() -> Iterator[ForkedReader | None]:
    """Fork a reader now, while this process runs one thread, for every export made inside the
    block (:meth:`ForkedLoads.start` hands it their batches); None where none can be forked."""
    global _kept
    if _kept is not None and _kept.alive:
        yield _kept
        return
    reader = _kept = ForkedReader.fork()
    try:
        yield reader
    finally:
        _kept = None
        if reader is not None:
            reader.close()


class ForkedLoads:
    """One batch of torch files shared with a forked child: :meth:`claim` says which process
    reads one, :meth:`get` waits for one the child read.

    Create with :meth:`start` (None where no child can read them); call :meth:`close` when done.
    """

    def __init__(self, reader: ForkedReader, claims: int, paths: list[Path]) -> None:
        self._reader = reader
        self._pid = reader.pid
        self._owns_reader = False
        self._index = {path: i for i, path in reversed(list(enumerate(paths)))}
        self._claims, self._count = claims, len(paths)
        self._mine: set[int] = set()
        self._last = -1  # the last index this process took
        self._idle = False  # every index taken, this process waits for the child's files
        self._messages: dict[int, bytearray] = {}
        self._ended = False
        self._clean_end = False
        self._ready = threading.Condition()
        self._drainer = threading.Thread(target=self._drain, args=(reader.channel,),
                                         daemon=True, name="forked-loads")
        self._drainer.start()

    @classmethod
    def start(cls, paths: list[Any]) -> ForkedLoads | None:
        """Share ``paths`` (in this order) with the reader :func:`kept_reader` keeps, or else
        with a child forked for them alone."""
        if not paths:
            return None
        if _kept is not None:
            loads = _kept.share(paths)
            if loads is not None:
                return loads
        reader = ForkedReader.fork()
        if reader is None:
            return None
        loads = reader.share(paths)
        if loads is None:
            reader.close()
            return None
        loads._owns_reader = True
        return loads

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
            self._close_claims()
            return False
        self._mine.add(got)
        self._last = got
        return got == index

    def _close_claims(self) -> None:
        os.close(self._claims)
        self._claims = -1

    def _drain(self, channel: socket.socket) -> None:
        # Receives each message whole as the child sends it, so the child never waits for
        # this process. A socket, not a pipe: a pipe passes 64 KiB a read, and this thread
        # had to take the GIL back from the reading thread after each (up to the switch
        # interval, 5 ms, each time: 0.1-0.2 s per file of tens of thousands of tensors, the
        # child waiting), where MSG_WAITALL receives a whole message in one call.
        clean = False
        while True:
            try:
                header = _receive(channel, _HEADER.size)
                if header is None:
                    break
                index, size = _HEADER.unpack(header)
                if index == _END:
                    clean = True
                    break
                body = _receive(channel, size)
            except OSError:  # the child is gone: what it did not send is read here
                break
            if body is None:
                break
            with self._ready:
                self._messages[index] = body
                self._ready.notify_all()
        with self._ready:
            self._ended = True  # the child is done with the batch (or died)
            self._clean_end = clean
            self._ready.notify_all()

    def get(self, path: Any) -> Any:
        """The :class:`~exporter.torchfile.TorchFile` of ``path`` as the child read it, or None
        when this process should read it (it took it, the child could not send it, or failed)."""
        index = self._index.get(Path(path))
        if index is None or index in self._mine:
            return None
        with self._ready:
            if self._claims < 0 or self._last == self._count - 1:
                self._idle = True
                self._ready.notify_all()
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

    def wait_idle(self) -> None:
        """Wait until this process has no file left to read but waits for the child's (in
        :meth:`get`), or the child has sent every file it took (or ended otherwise)."""
        with self._ready:
            self._ready.wait_for(lambda: self._ended or self._idle)

    def close(self) -> None:
        """End the batch: the indices the child has not taken are taken here, so it stops after
        the file it reads; the child is stopped if it does not end the batch (or this batch
        had it forked for it alone)."""
        if self._claims >= 0:
            while _read_index(self._claims) is not None:
                pass
            self._close_claims()
        with self._ready:
            self._ready.wait_for(lambda: self._ended, timeout=END_WAIT_SECONDS)
            clean = self._ended and self._clean_end
        self._reader.batch_ended(clean)
        if self._owns_reader:
            self._reader.close()
        self._drainer.join(timeout=5)


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


def _next_batch(control: socket.socket) -> tuple[list[str], int] | None:
    """The next batch's paths and claims pipe, or None when this process closed the reader."""
    header, fds, _, _ = socket.recv_fds(control, _HEADER.size, 1)
    if header and len(header) < _HEADER.size:
        header += _receive(control, _HEADER.size - len(header)) or b""
    if len(header) != _HEADER.size or len(fds) != 1:
        return None
    body = _receive(control, _HEADER.unpack(header)[1])
    return None if body is None else (marshal.loads(body), fds[0])


def _close_inherited(keep: set[int]) -> None:
    """Close every descriptor above stderr that this process inherited, but ``keep``."""
    for listing in ("/proc/self/fd", "/dev/fd"):  # Linux; macOS and the BSDs
        try:
            fds = [int(name) for name in os.listdir(listing)]
            break
        except (OSError, ValueError):
            continue
    else:  # no listing: the child ends with this process all the same
        return
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _serve(control: socket.socket, channel: socket.socket) -> None:
    """Read each batch's files as it claims them and send them; exits the process without
    returning, when this process closes the reader or exits."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _close_inherited({control.fileno(), channel.fileno()})
        # The objects copied from this process are never collected here (gc.freeze), and a
        # file's tree is freed by reference counts once sent: a collection after each batch
        # walks only what a pickle left in cycles. (Collecting while reading measured 0.22 s
        # against 0.05 s to encode a file of 36,000 tensors.)
        gc.disable()
        gc.freeze()
        with control, channel:
            while (batch := _next_batch(control)) is not None:
                paths, claims = batch
                try:
                    with alike_files():  # a batch: one step's partition files
                        while (index := _read_index(claims)) is not None:
                            try:
                                tf = load_torch_file(paths[index])
                                message: tuple[Any, ...] = ("ok", *encode_once(tf))
                            except (CheckpointFormatError, UnsafePickleError) as exc:
                                message = ("error", type(exc).__name__, str(exc))
                            except (Unsendable, RecursionError):
                                message = ("fallback",)
                            body = marshal.dumps(message)
                            channel.sendall(_HEADER.pack(index, len(body)) + body)
                finally:
                    os.close(claims)
                channel.sendall(_HEADER.pack(_END, 0))
                gc.collect()
    except BaseException:  # noqa: BLE001 - the parent reads what the child could not send
        code = 1
    finally:
        os._exit(code)
