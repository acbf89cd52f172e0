"""``--max-disk``: the bytes a build may hold on disk at once, and what a step needs of them.

A pipelined build holds, at one time, the download of the step it fetches ahead, the
download and growing output of the step it converts, and converted steps waiting for their
upload. Each step reserves what it will need before its fetch starts, in step order, and
gives it back in two parts: its download when its conversion ends (the fetch folder is
deleted), its output when the upload has taken it off the disk (or, with nothing to
upload, when the conversion ends: finished steps kept in the archive are the build's product,
not its working space). A reservation that does not fit waits for earlier steps to give
theirs back; since every earlier step can finish without reserving more, the build never
deadlocks, and it waits rather than exceed the bound.

A step's output is not known before it is converted. The first step reserves as much output
as its download (or twice as much when weights are cast to float32: a Pythia-era step keeps
fp16 weights and fp32 optimizer state, so a same-dtype export writes no more than it read);
later steps reserve the largest output-to-input ratio seen so far, plus a margin.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporter.errors import OptionsError

if TYPE_CHECKING:
    from exporter.dtypes import DType

log = logging.getLogger(__name__)

#: Room left for a step's small files (JSON, YAML, index shards) and rounding.
MARGIN = 1 << 20


@dataclass(frozen=True)
class StepNeed:
    """Bytes one step reserves: its download and its converted output."""

    download: int
    output: int

    @property
    def total(self) -> int:
        return self.download + self.output


class DiskBudget:
    """Reservations against a byte limit (no limit when ``limit`` is None).

    Thread-safe: the fetch thread (or the worker-pool loop) reserves, the convert and upload
    stages release.
    ``peak`` is the most ever reserved at once.
    """

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit <= 0:
            raise OptionsError(f"max_disk: must be positive, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._ratio: float | None = None
        self._lock = threading.Condition()
        self._closed = False

    def need(self, step: int, download: int, source_bytes: int, upcast: bool) -> StepNeed:
        """What ``step`` will hold at most; raises if that alone exceeds the limit."""
        ratio = self._ratio if self._ratio is not None else (2.0 if upcast else 1.0)
        need = StepNeed(download, int(source_bytes * ratio) + MARGIN)
        if self.limit is not None and need.total > self.limit:
            raise OptionsError(
                f"max_disk: step {step} needs about {need.total:,} bytes at once "
                f"({need.download:,} downloaded, {need.output:,} converted), more than "
                f"max_disk={self.limit:,}; raise --max-disk to at least {need.total:,}")
        return need

    def observe(self, source_bytes: int, output_bytes: int, reserved: int) -> None:
        """Learn a converted step's output-to-input ratio for later reservations."""
        if output_bytes > reserved:
            log.warning("a step wrote %d bytes, more than the %d it reserved; later steps "
                        "reserve more", output_bytes, reserved)
        if source_bytes > 0:
            ratio = output_bytes / source_bytes * 1.02
            self._ratio = ratio if self._ratio is None else max(self._ratio, ratio)

    def reserve(self, nbytes: int) -> bool:
        """Wait until ``nbytes`` fit, then hold them; False if the budget was closed meanwhile."""
        with self._lock:
            while (self.limit is not None and self.used > 0 and self.used + nbytes > self.limit
                   and not self._closed):
                self._lock.wait()
            if self._closed:
                return False
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            return True

    def try_reserve(self, nbytes: int) -> bool:
        """Hold ``nbytes`` if they fit now (or nothing is held); never waits."""
        with self._lock:
            if self.limit is not None and self.used > 0 and self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)
            self._lock.notify_all()

    def close(self) -> None:
        """Wake and refuse every waiting reservation (the build is stopping)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()


def upcasts(dtype: DType | None) -> bool:
    """Whether an export to ``dtype`` may write more bytes than the checkpoint holds."""
    return dtype is not None and dtype.itemsize > 2
