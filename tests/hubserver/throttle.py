"""Bandwidth limits of the test Hub server: one shared link, paced per direction.

The server calls :meth:`Link.sent` for every chunk of a response body it writes and
:meth:`Link.received` for every chunk of a request body it reads; each direction is a single
pipe of ``rate`` bytes per second shared by all connections, as a machine's uplink is, so
parallel transfers share the rate rather than multiply it. :meth:`Link.transfers` lists the
requests being served (client port, method, path), so a test can find the process behind a
download while it is running.

Example::

    server = HubServer(tmp_path).start()
    server.link.limit(download=50e6, upload=20e6)   # bytes per second
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

#: Seconds of transfer a pipe may catch up after falling behind (a late-waking sender), as a
#: link's buffers let it (a token bucket's burst, as in Linux ``tc tbf``): without it every
#: oversleep of a busy machine would be lost and the rate undershot.
BURST = 0.25


class Pipe:
    """One direction of the link: ``rate`` bytes per second (None: unlimited)."""

    def __init__(self, rate: float | None = None) -> None:
        self.rate = rate
        self.bytes = 0
        self._free_at = 0.0
        self._lock = threading.Lock()

    def pass_bytes(self, nbytes: int) -> None:
        """Wait until ``nbytes`` have had their slot on the pipe (they queue behind others)."""
        with self._lock:
            self.bytes += nbytes
            if not self.rate:
                return
            now = time.monotonic()
            start = max(now - BURST, self._free_at)
            self._free_at = start + nbytes / self.rate
            wait = self._free_at - now
        if wait > 0:
            time.sleep(wait)


@dataclass(frozen=True)
class Transfer:
    """A request being served: the client's port, the method and the path."""

    port: int
    method: str
    path: str


class Link:
    """The server's network link: download (server to client) and upload pipes."""

    def __init__(self) -> None:
        self.download = Pipe()
        self.upload = Pipe()
        self._active: dict[int, Transfer] = {}
        self._lock = threading.Lock()

    def limit(self, *, download: float | None = None, upload: float | None = None) -> None:
        """Set the rates in bytes per second (None: unlimited) and reset the byte counts."""
        self.download = Pipe(download)
        self.upload = Pipe(upload)

    def sent(self, nbytes: int) -> None:
        self.download.pass_bytes(nbytes)

    def received(self, nbytes: int) -> None:
        self.upload.pass_bytes(nbytes)

    def begin(self, port: int, method: str, path: str) -> int:
        with self._lock:
            self._active[port] = Transfer(port, method, path)
        return port

    def end(self, port: int) -> None:
        with self._lock:
            self._active.pop(port, None)

    def transfers(self) -> list[Transfer]:
        """Requests being served now."""
        with self._lock:
            return list(self._active.values())
