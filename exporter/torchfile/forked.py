"""Reading torch files in a forked child process too: a second core for many pickles.

Why: reading a pickle holds the GIL (the C unpickler calls back into Python for every tensor),
so threads cannot share the work. A ZeRO checkpoint written with a small ``reduce_bucket_size``
has a pickle of tens of thousands of tensors per partition file, eight files or more per step:
measured on the 2-core machine, 0.36 s per file, 2.9 s per step, on one core while the other
waits. A child forked from this process (torch and the reader already imported: no start-up)
reads files while this process reads others.

Who reads which file is decided as they go: the files of a batch (one step's partition files)
have their indices wait in two pipes, each in the order this process needs them, and each
process takes the next one of its own pipe when it is free, then of the other's (a read of 4
bytes from a pipe takes them whole). The child's pipe holds the files named to it first
(:func:`exporter.neox.zero.order.child_share`): those whose pickle is not the one most files
of their unit share, but for numbers, and every second unit's files
(:mod:`exporter.torchfile.repeats` rebuilds a file whose pickle is the one read before, or that
one with numbers changed, so each pickle is read in full once, by one process). The child
never waits; this process reads fewer files when it is slower, and
once it has none left to read it waits for the child's (:meth:`ForkedLoads.wait_idle`: the
core it frees can write).

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
import marshal
import os
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile import TorchFile
from exporter.torchfile.forkchild import END as _END
from exporter.torchfile.forkchild import HEADER as _HEADER
from exporter.torchfile.forkchild import claims_pipe, read_index, receive, serve
from exporter.torchfile.sendable import Decoder

#: Files one batch can share (their indices fill a pipe's 64 KiB buffer at most).
MAX_SHARED = 16_000
#: How long closing a batch waits for the child to finish the file it is reading, after which
#: the child is stopped (a file takes about a second at most; the wait only bounds a fault).
END_WAIT_SECONDS = 60.0
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
            serve(control_there, channel_there)
        control_there.close()
        channel_there.close()
        return cls(pid, control, channel)

    @property
    def alive(self) -> bool:
        return not self._closed

    def share(self, paths: list[Any], child_first: Sequence[int] = ()) -> ForkedLoads | None:
        """Hand the child a batch of ``paths`` to read as it claims them, those at the indices
        ``child_first`` first (None when it is gone, reading another batch, or no path could
        be shared)."""
        with self._lock:
            if self._closed or self._busy or not paths:
                return None
            shared = [Path(p) for p in paths][:MAX_SHARED]
            firsts = [i for i in dict.fromkeys(child_first) if 0 <= i < len(shared)]
            taken = set(firsts)
            queues = [firsts, [i for i in range(len(shared)) if i not in taken]]
            pipes = [claims_pipe(queue) for queue in queues]
            fds = [fd for fd, _ in pipes]
            # Indices a pipe could not take are in neither: this process reads them.
            queues = [queue[:count] for queue, (_, count) in zip(queues, pipes, strict=True)]
            body = marshal.dumps([os.fspath(p) for p in shared])
            try:
                socket.send_fds(self._control, [_HEADER.pack(len(shared), len(body))], fds)
                self._control.sendall(body)
            except OSError:  # the child is gone, or its socket broke: it reads nothing more
                for fd in fds:
                    os.close(fd)
                self._stop()
                return None
            self._busy = True
        # This process takes from the shared queue first, then from the child's.
        return ForkedLoads(self, list(zip(fds[::-1], queues[::-1], strict=True)), shared)

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

    def __init__(self, reader: ForkedReader, claims: list[tuple[int, list[int]]],
                 paths: list[Path]) -> None:
        self._reader = reader
        self._pid = reader.pid
        self._owns_reader = False
        self._index = {path: i for i, path in reversed(list(enumerate(paths)))}
        # The claims pipes, each with the indices in it in order; where each index waits.
        self._claims = [fd for fd, _ in claims]
        self._queues = [queue for _, queue in claims]
        self._where = {i: (q, at) for q, queue in enumerate(self._queues)
                       for at, i in enumerate(queue)}
        self._mine: set[int] = set()
        self._last = [-1] * len(claims)  # per pipe, the place of the last index taken here
        self._idle = False  # every index taken, this process waits for the child's files
        self._messages: dict[int, bytearray] = {}
        self._ended = False
        self._clean_end = False
        self._ready = threading.Condition()
        self._drainer = threading.Thread(target=self._drain, args=(reader.channel,),
                                         daemon=True, name="forked-loads")
        self._drainer.start()

    @classmethod
    def start(cls, paths: list[Any], child_first: Sequence[int] = ()) -> ForkedLoads | None:
        """Share ``paths`` (in this order; the child reads those at ``child_first`` first)
        with the reader :func:`kept_reader` keeps, or else with a child forked for them
        alone."""
        if not paths:
            return None
        if _kept is not None:
            loads = _kept.share(paths, child_first)
            if loads is not None:
                return loads
        reader = ForkedReader.fork()
        if reader is None:
            return None
        loads = reader.share(paths, child_first)
        if loads is None:
            reader.close()
            return None
        loads._owns_reader = True
        return loads

    def order(self, paths: list[Any]) -> list[int]:
        """The positions in ``paths`` in the order to :meth:`claim` them: those not shared,
        then those of this process's pipe, then those of the child's, each in its pipe's
        order."""
        where = [self._where.get(self._index.get(Path(p), -1), (-1, 0)) for p in paths]
        return sorted(range(len(paths)), key=where.__getitem__)

    def claim(self, path: Any) -> bool:
        """Whether this process reads ``path`` (else the child does: :meth:`get` it).

        Ask in the order :meth:`order` gives: each pipe's indices are taken in its order, so
        one placed before the last this process took from its pipe was taken by the child.
        """
        index = self._index.get(Path(path))
        if index is None or index in self._mine or index not in self._where:
            return True
        queue, at = self._where[index]
        if at < self._last[queue] or self._claims[queue] < 0:
            return False
        got = read_index(self._claims[queue])
        if got is None:  # every index of that pipe is taken, this one by the child
            self._close_claims(queue)
            return False
        self._mine.add(got)
        self._last[queue] = self._where[got][1]
        return got == index

    def _close_claims(self, queue: int) -> None:
        if self._claims[queue] >= 0:
            os.close(self._claims[queue])
            self._claims[queue] = -1

    def _all_claimed(self) -> bool:
        return all(fd < 0 or self._last[q] == len(self._queues[q]) - 1
                   for q, fd in enumerate(self._claims))

    def _drain(self, channel: socket.socket) -> None:
        # Receives each message whole as the child sends it, so the child never waits for
        # this process. A socket, not a pipe: a pipe passes 64 KiB a read, and this thread
        # had to take the GIL back from the reading thread after each (up to the switch
        # interval, 5 ms, each time: 0.1-0.2 s per file of tens of thousands of tensors, the
        # child waiting), where MSG_WAITALL receives a whole message in one call.
        clean = False
        while True:
            try:
                header = receive(channel, _HEADER.size)
                if header is None:
                    break
                index, size = _HEADER.unpack(header)
                if index == _END:
                    clean = True
                    break
                body = receive(channel, size)
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

    def get(self, path: Any, runs: bool = False) -> Any:
        """The :class:`~exporter.torchfile.TorchFile` of ``path`` as the child read it, or None
        when this process should read it (it took it, the child could not send it, or failed).
        ``runs``: as :func:`~exporter.torchfile.load_torch_file` takes it."""
        index = self._index.get(Path(path))
        if index is None or index in self._mine or index not in self._where:
            return None
        with self._ready:
            if self._all_claimed():
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
        obj = Decoder(Path(path), refs, storages, runs).decode(encoded)
        return TorchFile(Path(path), obj, globals_, runs=runs)

    def wait_idle(self) -> None:
        """Wait until this process has no file left to read but waits for the child's (in
        :meth:`get`), or the child has sent every file it took (or ended otherwise)."""
        with self._ready:
            self._ready.wait_for(lambda: self._ended or self._idle)

    def close(self) -> None:
        """End the batch: the indices the child has not taken are taken here, so it stops after
        the file it reads; the child is stopped if it does not end the batch (or this batch
        had it forked for it alone)."""
        for queue, fd in enumerate(self._claims):
            if fd >= 0:
                while read_index(fd) is not None:
                    pass
                self._close_claims(queue)
        with self._ready:
            self._ready.wait_for(lambda: self._ended, timeout=END_WAIT_SECONDS)
            clean = self._ended and self._clean_end
        self._reader.batch_ended(clean)
        if self._owns_reader:
            self._reader.close()
        self._drainer.join(timeout=5)
