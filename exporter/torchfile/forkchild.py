"""The forked reader's child side, and the messages both sides exchange
(:mod:`exporter.torchfile.forked` says why and how).

A batch comes over the control socket as a header (path count, body size) with two claims
pipes attached (the child's own first), then the paths as :mod:`marshal` data. Each file goes
back over the channel as a header (its index, body size) and a :mod:`marshal` body: ``("ok",
tree, refs, storages, globals)``, ``("error", class name, message)`` or ``("fallback",)``;
a header with index :data:`END` ends the batch.
"""

from __future__ import annotations

import gc
import marshal
import os
import signal
import socket
import struct
from collections.abc import Iterator
from typing import Any

from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile import load_torch_file
from exporter.torchfile.repeats import alike_files, encode_once
from exporter.torchfile.sendable import Unsendable

HEADER = struct.Struct("<IQ")  # file index, message size
INDEX = struct.Struct("<I")
END = 0xFFFFFFFF  # the index of the message that ends a batch


def receive(channel: socket.socket, size: int) -> bytearray | None:
    """The next ``size`` bytes from ``channel``, or None when it ends before them."""
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        n = channel.recv_into(view[got:], size - got, socket.MSG_WAITALL)
        if n == 0:
            return None
        got += n
    return data


def claims_pipe(indices: list[int]) -> tuple[int, int]:
    """A pipe's read end holding ``indices``, or as many of the first as it takes (64 KiB on
    Linux: :data:`~exporter.torchfile.forked.MAX_SHARED`), and how many; its write end is
    closed, so both processes see the end once every index is taken."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        written = os.write(write_end, b"".join(INDEX.pack(i) for i in indices)) if indices else 0
    except BlockingIOError:
        written = 0
    finally:
        os.close(write_end)
    return read_end, written // INDEX.size


def read_index(fd: int) -> int | None:
    """The next index of the claims pipe, or None when all are taken."""
    data = os.read(fd, INDEX.size)
    return INDEX.unpack(data)[0] if len(data) == INDEX.size else None


def _next_batch(control: socket.socket) -> tuple[list[str], list[int]] | None:
    """The next batch's paths and claims pipes (the child's own first), or None when this
    process closed the reader."""
    header, fds, _, _ = socket.recv_fds(control, HEADER.size, 2)
    if header and len(header) < HEADER.size:
        header += receive(control, HEADER.size - len(header)) or b""
    if len(header) != HEADER.size or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        return None
    body = receive(control, HEADER.unpack(header)[1])
    return None if body is None else (marshal.loads(body), fds)


def _claimed(claims: list[int]) -> Iterator[int]:
    """The indices the child takes: from its own pipe, then from this process's."""
    for fd in claims:
        while (index := read_index(fd)) is not None:
            yield index


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


def serve(control: socket.socket, channel: socket.socket) -> None:
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
                        for index in _claimed(claims):
                            try:
                                tf = load_torch_file(paths[index])
                                message: tuple[Any, ...] = ("ok", *encode_once(tf))
                            except (CheckpointFormatError, UnsafePickleError) as exc:
                                message = ("error", type(exc).__name__, str(exc))
                            except (Unsendable, RecursionError):
                                message = ("fallback",)
                            body = marshal.dumps(message)
                            channel.sendall(HEADER.pack(index, len(body)) + body)
                finally:
                    for fd in claims:
                        os.close(fd)
                channel.sendall(HEADER.pack(END, 0))
                gc.collect()
    except BaseException:  # noqa: BLE001 - the parent reads what the child could not send
        code = 1
    finally:
        os._exit(code)
