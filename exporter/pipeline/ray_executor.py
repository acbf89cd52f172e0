"""Run build steps as Ray tasks (``pip install neox-exporter[ray]``).

One task per step; tasks request a GPU when the export runs on CUDA. Tasks write straight
into the archive folder, so the folder must be shared storage on a multi-node cluster; the
coordinating process collects outcomes and writes the manifest, as in a local build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from exporter.errors import ExporterError


def run_on_ray(
    source: Any,
    root: Path,
    steps: list[int],
    options: Any,
    address: str | None,
    convert: Callable[..., Any],
    max_in_flight: int = 4,
) -> Iterator[Any]:
    try:
        import ray
    except ImportError as exc:
        raise ExporterError("the ray executor needs Ray: pip install 'neox-exporter[ray]'") from exc
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
        started = True
    try:
        task = ray.remote(num_gpus=1 if options.device == "cuda" else 0)(convert)
        queue = list(steps)
        pending: dict[Any, int] = {}
        while queue or pending:
            while queue and len(pending) < max(1, max_in_flight):
                step = queue.pop(0)
                pending[task.remote(source, step, root, options)] = step
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                yield ray.get(ref)
    finally:
        if started:
            ray.shutdown()
