"""Run build steps as Ray tasks (``pip install neox-exporter[ray]``).

One task per step, at most ``max_in_flight`` at once; tasks request a GPU when the export runs
on CUDA. Two ways to run them:

* with an upload target (``build --push-to``), each task runs
  :func:`exporter.pipeline.remote.build_and_upload` in its node's own scratch folder and
  uploads its tensor files itself; nothing a task writes needs to be visible to another node;
* without one, tasks write straight into the archive folder, which must then be shared storage
  on a multi-node cluster.

Faults: a task whose worker process or node dies is retried by Ray on any node
(``max_retries``, system failures only: ``retry_exceptions=False``, since a step that fails for
its own reasons returns a ``failed`` outcome instead of raising); a task lost past its retries
becomes a ``failed`` outcome naming the cause. The coordinating process collects the results
and writes the manifest, as in a local build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from exporter.errors import ExporterError
from exporter.records import StepOutcome

#: Attempts after the first for a task whose worker or node died.
TASK_RETRIES = 3


def run_on_ray(
    steps: list[int],
    task: Callable[..., Any],
    args: Callable[[int], tuple[Any, ...]],
    address: str | None,
    gpu: bool = False,
    max_in_flight: int = 4,
    retries: int = TASK_RETRIES,
) -> Iterator[tuple[int, Any]]:
    """Run ``task(*args(step))`` for every step on Ray; yields ``(step, result)`` as they end.

    A task lost past its retries yields a failed :class:`StepOutcome` as its result.
    """
    try:
        import ray
        from ray.exceptions import RayError, RayTaskError
    except ImportError as exc:
        raise ExporterError("the ray executor needs Ray: pip install 'neox-exporter[ray]'") from exc
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
        started = True
    try:
        remote = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=retries,
                            retry_exceptions=False)(task)
        queue = list(steps)
        pending: dict[Any, int] = {}
        while queue or pending:
            while queue and len(pending) < max(1, max_in_flight):
                step = queue.pop(0)
                pending[remote.remote(*args(step))] = step
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                step = pending.pop(ref)
                try:
                    yield step, ray.get(ref)
                except RayError as exc:
                    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    # A task that raised was not retried (retry_exceptions=False); any other
                    # RayError means its worker or node died on every attempt.
                    what = ("task raised" if isinstance(exc, RayTaskError)
                            else f"task lost after {retries} retries")
                    yield step, StepOutcome(step, "failed", error=(
                        f"{what} ({type(exc).__name__}: {cause})"))
    finally:
        if started:
            ray.shutdown()
