"""A lock on an archive folder for the commands that write it (``build``, ``push``).

Two writers on one archive undo each other: a build clears interrupted steps and temporaries
at start-up, which are the running build's partial step. So a writer holds ``ARCHIVE/.lock``
while it runs; a second one is refused with the holder's pid, host and command (or, with
``wait``, waits for it). Readers (``verify``, ``open_archive``) never take it.

The lock is an advisory ``flock(2)`` on that file, not the file's existence: the kernel drops
it when the holder's last descriptor closes, so a process that died (even by SIGKILL) leaves no
stale lock to break by hand, and two processes that both find a dead holder cannot both take
over (the take-over is the kernel's, atomic). The file's content only names the holder for the
message. Worker processes forked by a build inherit the descriptor, so the lock stays held
while any of them may still write. A process may take the lock again while it holds it
(``build --push-to`` publishes under the build's lock).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from exporter.archive.layout import lock_path
from exporter.errors import ArchiveLockedError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2

# Locks this process holds: lock file -> (descriptor, depth), for re-entry.
_held: dict[str, tuple[int, int]] = {}
_held_guard = threading.Lock()


def lock_holder(root: str | os.PathLike[str]) -> str:
    """Who holds (or last held) the lock of the archive at ``root``, in words."""
    try:
        data = json.loads(lock_path(Path(root)).read_text(encoding="utf-8"))
        pid, host = int(data["pid"]), str(data["host"])
        alive = "" if host != socket.gethostname() or _running(pid) else ", no longer running"
        return (f"pid {pid} on {host} ({data.get('command', '?')}, since "
                f"{data.get('since', '?')}{alive})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not named itself yet)"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def archive_lock(root: str | os.PathLike[str], *, wait: bool | float = False,
                 command: str | None = None) -> Iterator[None]:
    """Hold the write lock of the archive at ``root`` (created if missing) for the block.

    Args:
        root: the archive folder.
        wait: False: refuse at once if another process holds the lock; True: wait for it as
            long as it takes; a number: wait at most that many seconds.
        command: what this process is doing, for the message another writer gets.

    Raises:
        ArchiveLockedError: another process holds the lock (naming it), and ``wait`` is False
            or its time ran out.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> with archive_lock(root, command="build"):
        ...     with archive_lock(root):   # the same process may take it again
        ...         pass
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = lock_path(root)
    key = os.path.realpath(path)
    with _held_guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if not reentered:
        fd = _acquire(root, path, wait)
        _name_holder(fd, command)
        with _held_guard:
            _held[key] = (fd, 1)
    try:
        yield
    finally:
        with _held_guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                # The content stays: it only names a holder, and flock alone says whether
                # anyone holds the lock.
                os.close(fd)


def _acquire(root: Path, path: Path, wait: bool | float) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = None if wait is True else time.monotonic() + float(wait or 0)
    told = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            holder = lock_holder(root)
            if deadline is not None and time.monotonic() >= deadline:
                raise ArchiveLockedError(
                    f"{root} is being written by {holder}; let it finish (or stop it), or "
                    f"use --wait to wait for it")
            if not told:
                log.warning("%s is being written by %s; waiting for it to finish", root, holder)
                told = True
            time.sleep(POLL_SECONDS)
    except BaseException:
        os.close(fd)
        raise


def _name_holder(fd: int, command: str | None) -> None:
    """Write who holds the lock into the (locked) file, for the message of a refused writer."""
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "command": command or " ".join(["neox-export", *sys.argv[1:]]),
                       "since": datetime.now(UTC).isoformat(timespec="seconds")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode("utf-8"), 0)
