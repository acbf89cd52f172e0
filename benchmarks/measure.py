"""Run a command as a child process and take its wall time, CPU time and peak RSS.

Standard library only, on purpose: Linux counts the parent's resident pages at fork time
into a child's peak RSS (``setup_new_exec`` folds the old mm's high-water mark into
``ru_maxrss``), so the measuring process must stay small: no torch, no numpy.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata


@dataclass(frozen=True)
class Run:
    """One measured run of a command."""

    seconds: float
    cpu_seconds: float
    max_rss: int  # bytes
    returncode: int


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion; ``os.wait4`` gives the resources of that child alone (its
    peak RSS is the largest of the process and the descendants it waited for)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read()[-2000:].decode("utf-8", "replace")
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
               proc.returncode)


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            total_kb = int(fh.readline().split()[1])
        memory = f"{total_kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "memory": memory,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def best_of(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``run``, in seconds (in-process timings)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
