"""A local build as a pipeline: fetch step N+1 while step N converts and step N-1 uploads.

Three stages, each on a thread of its own, so the network and the CPU work at once:

* fetch (a thread here): reserves the step's disk need (:mod:`exporter.pipeline.disk`), then
  downloads it (``Source.fetch``; a local source reads in place and downloads nothing);
* convert (the calling thread): converts the fetched step into the archive, deletes the
  download, and yields the outcome;
* upload (:class:`exporter.hub.uploader.StepUploader`, with ``--push-to``): uploads the step's
  files, removes them with ``--delete-after-push``, and commits steps in batches.

At most one step is fetched ahead of the one converting, and less when ``--max-disk`` says so:
a network-bound build then runs at the speed of its link, a CPU-bound one at the speed of its
conversion (benchmarks/hub_pipeline.py measures it against a throttled test Hub).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from exporter.hub.uploader import StepUploader
from exporter.pipeline.disk import DiskBudget, StepNeed, upcasts
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.step import convert_fetched, failed_step
from exporter.records import StepOutcome
from exporter.sources import Source
from exporter.sources.base import FetchedCheckpoint

Progress = Callable[[int, int | None], AbstractContextManager[Callable[[int], None] | None]]


@dataclass
class _Fetched:
    step: int
    need: StepNeed
    source_bytes: int
    context: AbstractContextManager[FetchedCheckpoint] | None = None
    checkpoint: FetchedCheckpoint | None = None
    error: Exception | None = None


def run_pipelined(source: Source, root: Path, steps: list[int], options: ExportOptions,
                  budget: DiskBudget, uploader: StepUploader | None,
                  progress: Progress) -> Iterator[StepOutcome]:
    """Convert ``steps`` in order, fetching ahead and uploading behind; yields each outcome.

    Args:
        source: where checkpoints come from.
        root: the archive folder.
        steps: steps to convert, in order.
        options: what each step writes.
        budget: the disk bound every step reserves against.
        uploader: the upload stage (None: nothing to upload).
        progress: ``progress(step, total_bytes)`` gives a per-step byte counter.
    """
    ahead: queue.Queue[_Fetched | None] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def fetch_all() -> None:
        try:
            for step in steps:
                if stop.is_set():
                    return
                try:
                    need, size = plan_step(source, step, options, budget)
                except Exception as exc:  # noqa: BLE001 - the step fails, named, the rest go on
                    ahead.put(_Fetched(step, StepNeed(0, 0), 0, error=exc))
                    continue
                if not budget.reserve(need.total):
                    return
                item = _Fetched(step, need, size)
                try:
                    item.context = source.fetch(step)
                    item.checkpoint = item.context.__enter__()
                except Exception as exc:  # noqa: BLE001 - as above
                    budget.release(need.total)
                    item.context, item.error = None, exc
                ahead.put(item)
        finally:
            ahead.put(None)

    fetcher = threading.Thread(target=fetch_all, name="step-fetcher", daemon=True)
    fetcher.start()
    drained = False
    try:
        while (item := ahead.get()) is not None:
            if item.error is not None or item.checkpoint is None:
                yield failed_step(root, item.step, item.error or RuntimeError("fetch failed"))
                continue
            try:
                with progress(item.step, item.source_bytes or None) as bar:
                    outcome = convert_fetched(source, item.checkpoint, root, options, bar)
            except Exception as exc:  # noqa: BLE001 - one step's failure must not stop a build
                outcome = failed_step(root, item.step, exc)
            finally:
                assert item.context is not None
                item.context.__exit__(None, None, None)
                budget.release(item.need.download)
            yield from hand_on(outcome, item.need, item.source_bytes, budget, uploader)
        drained = True
    finally:
        stop.set()
        budget.close()
        # Stopped early: take what the fetcher still hands over (it ends with None) and delete
        # those downloads.
        while not drained and (leftover := ahead.get()) is not None:
            if leftover.context is not None:
                leftover.context.__exit__(None, None, None)
        fetcher.join()


def plan_step(source: Source, step: int, options: ExportOptions,
              budget: DiskBudget) -> tuple[StepNeed, int]:
    """What ``step`` will hold on disk, and its source's size; raises if it cannot fit."""
    from exporter.hub.source import HubSource

    size = source.step_bytes(step) or 0
    download = size if isinstance(source, HubSource) else 0
    return budget.need(step, download, size, upcasts(options.dtype)), size


def hand_on(outcome: StepOutcome, need: StepNeed, source_bytes: int, budget: DiskBudget,
            uploader: StepUploader | None) -> Iterator[StepOutcome]:
    """Yield a converted step's outcome (its download already released); its output stays
    reserved until the upload has taken it off the disk."""
    output = need.output
    if outcome.status != "done":
        budget.release(output)
        yield outcome
        return
    budget.observe(source_bytes, outcome.bytes_out, output)
    if outcome.bytes_out < output:
        budget.release(output - outcome.bytes_out)
        output = outcome.bytes_out
    yield outcome
    if uploader is None:
        budget.release(output)
    else:
        uploader.submit(outcome.step, lambda: budget.release(output))
