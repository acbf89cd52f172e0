"""The threads of the conversion pipeline (:mod:`exporter.convert.stream`): a reader that
reads chunks ahead, and consumer stages, joined by bounded queues.

Every wait on a queue or a thread is bounded (:data:`WAIT_S`) and checks the pipeline's events.
A KeyboardInterrupt can land inside ``queue.Queue``'s own ``Condition`` code in the caller thread
and lose a wake-up (CPython 3.11 ``threading.Condition.notify`` releases a waiter, then removes
it from the list: an interrupt in between leaves a stale waiter that takes the next notify) or
leave the queue's mutex released under another thread (seen: ``RuntimeError: release unlocked
lock`` in a stage), so a blocking ``get``/``put``/``join`` could wait forever, as a build once
did for 12 minutes. After an interrupt or error in the caller thread the threads drop their
work, the caller touches no queue again, and threads that do not end within :data:`ABANDON_S`
are left behind (they are daemons: the process still exits).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from exporter.records import TensorJob

QUEUE_DEPTH = 2  # chunks waiting in front of each stage
WAIT_S = 0.1  # longest single wait on a queue or thread before the events are checked again
ABANDON_S = 2.0  # after an interrupt, how long the caller waits for a thread to end

BEGIN, END, STOP = "begin", "end", "stop"


class Item(Protocol):
    """What a stage is handed: something to call ``done()`` on once handled."""

    def done(self) -> None: ...


class Aborted(Exception):
    """A stage failed: the caller stops feeding and re-raises the stage's error."""


def join(thread: threading.Thread, stopped: threading.Event) -> None:
    """Wait for ``thread`` in bounded steps; once ``stopped`` is set, for at most ABANDON_S."""
    deadline: float | None = None
    while thread.is_alive():
        if stopped.is_set():
            deadline = deadline if deadline is not None else time.monotonic() + ABANDON_S
            if time.monotonic() >= deadline:
                return  # a daemon thread stuck on a lost wake-up: left behind
        thread.join(WAIT_S)


class Stage:
    """A consumer thread: ``handle(kind, index, piece)`` for each item, in order.

    ``failed``: a stage failed (the others skip their work); ``stopped``: the caller thread was
    interrupted (every thread drops its work and ends)."""

    def __init__(self, name: str, handle: Callable[[str, int, Item | None], None],
                 failed: threading.Event, stopped: threading.Event) -> None:
        self.queue: queue.Queue[tuple[str, int, Item | None]] = queue.Queue(QUEUE_DEPTH)
        self.error: BaseException | None = None
        self._handle = handle
        self._failed = failed
        self._stopped = stopped
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                kind, index, piece = self.queue.get(timeout=WAIT_S)
            except queue.Empty:
                continue
            except BaseException as exc:  # noqa: BLE001 - the queue was broken by an interrupt
                if not self._stopped.is_set():  # (its mutex released under this thread)
                    self.error = exc
                    self._failed.set()
                return
            if kind == STOP:
                return
            try:
                if not self._failed.is_set():
                    self._handle(kind, index, piece)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller thread
                self.error = exc
                self._failed.set()
            finally:
                if piece is not None:
                    piece.done()

    def put(self, item: tuple[str, int, Item | None]) -> None:
        while True:
            if self._failed.is_set() or self._stopped.is_set():
                raise Aborted
            try:
                self.queue.put(item, timeout=WAIT_S)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        """Let the thread finish its queue and end; after an interrupt, just let it end."""
        while self._thread.is_alive() and not self._stopped.is_set():
            try:
                self.queue.put((STOP, -1, None), timeout=WAIT_S)
                break
            except queue.Full:
                continue
        join(self._thread, self._stopped)


class Reader:
    """Reads every job's chunks ahead of the caller in a thread of its own."""

    def __init__(self, jobs: Sequence[TensorJob], chunk_bytes: int, failed: threading.Event,
                 stopped: threading.Event):
        self.queue: queue.Queue[Any] = queue.Queue(QUEUE_DEPTH)
        self._jobs = jobs
        self._chunk_bytes = chunk_bytes
        self._failed = failed
        self._stopped = stopped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="convert-read", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not (self._stop.is_set() or self._stopped.is_set()):
            try:
                self.queue.put(item, timeout=WAIT_S)
                return True
            except queue.Full:
                continue
        return False

    def _loop(self) -> None:
        try:
            for job in self._jobs:
                for chunk in job.chunks(self._chunk_bytes):
                    if not self._put(chunk):
                        return
                if not self._put(END):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller thread
            self._put(exc)

    def chunks(self) -> Iterator[torch.Tensor]:
        """The current job's chunks."""
        while True:
            try:
                item = self.queue.get(timeout=WAIT_S)
            except queue.Empty:
                if self._failed.is_set():
                    raise Aborted from None
                continue
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        self._stop.set()
        join(self._thread, self._stopped)
