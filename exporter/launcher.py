"""The installed ``neox-export`` (and ``python -m exporter``): the process set up before the
command's imports, then :func:`exporter.cli.main.run`.

This module imports nothing but the standard library, so what :func:`run` does comes first:

- **The cyclic garbage collector is off while the command's modules load, and what they made
  is frozen** (:func:`gc.freeze`). Importing numpy, click and the package makes tens of
  thousands of objects that live as long as the process (torch, where a command imports it,
  about a million); each of the collections their allocations trigger walks them again, and
  so does the first full collection of the work after. Measured on the 2-core machine (``gc.callbacks``), for ``convert`` of the 2.2 GB
  checkpoint of ``benchmarks/RESULTS.md``: 0.10-0.16 s of collections during the imports
  (381 of them), and a full collection of 0.07-0.09 s during the export; with this start,
  none during the imports and none full during the export (0.005 s in all).
  Objects freed later are freed as ever; only cycles among what the imports made stay
  uncollected.
- **numpy's OpenBLAS runs on the calling thread** (``OPENBLAS_NUM_THREADS=1`` unless the
  environment sets it). The statistics call BLAS only on rows short enough to stay on the
  calling thread (:mod:`exporter.convert.stats`), from one thread per file; OpenBLAS's own
  thread team would only spin (0.13 CPU s at start-up, measured with ``perf``) and, on a
  longer call, compete with those threads for the cores.
"""

from __future__ import annotations

import gc
import os
from typing import NoReturn


def run() -> NoReturn:
    """Set the process up, import the command, run it (it ends the process)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    collecting = gc.isenabled()
    gc.disable()
    try:
        from exporter.cli.main import run as run_command
    finally:
        if collecting:
            gc.enable()
    gc.freeze()
    run_command()
