"""``build``: steps x (fetch -> convert -> index), resumable, on local processes or Ray.

Each step runs :func:`exporter.pipeline.step.convert_step`; complete steps are skipped, so a build
killed at any point converges to the same archive. Only the coordinating process writes
``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exporter.archive.layout import foreign_entries, lock_path
from exporter.archive.lock import archive_lock
from exporter.archive.manifest import Manifest
from exporter.errors import ExporterError, OptionsError
from exporter.files import is_temporary
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.step import (
    completed_outcome,
    remove_temporaries,
    safe_convert,
    step_complete,
)
from exporter.pipeline.steps import check_step_spec, parse_steps
from exporter.pipeline.summary import BuildSummary
from exporter.records import StepOutcome
from exporter.sources import Source

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


@dataclass
class BuildOptions:
    """How to build an archive.

    Attributes:
        export: what each step writes.
        steps: a step selection (see :func:`exporter.pipeline.steps.parse_steps`), None for all.
        workers: steps converted in parallel (local processes).
        executor: ``local`` or ``ray``.
        ray_address: Ray cluster address (None starts or joins a local one).
        keep_going: a failing step is recorded and the others continue.
        verify_existing: re-hash complete steps' files before skipping them.
        on_step_done: called in the coordinating process after each finished step
            (publishing hooks in here).
        log_json: one JSON line per step on stderr instead of log lines.
        quiet: no progress bars.
        wait: another process writing the archive (holding its lock) makes the build wait
            for it (True, or at most that many seconds) instead of failing at once.

    Raises:
        OptionsError: a value the build cannot use, named (checked when made).
    """

    export: ExportOptions = field(default_factory=ExportOptions)
    steps: str | None = None
    workers: int = 1
    executor: str = "local"
    ray_address: str | None = None
    keep_going: bool = False
    verify_existing: bool = True
    on_step_done: Callable[[int], None] | None = None
    log_json: bool = False
    quiet: bool = False
    wait: bool | float = False

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise OptionsError(f"executor: {self.executor!r} (use {' or '.join(EXECUTORS)})")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise OptionsError(f"workers: must be at least 1, got {self.workers!r}")
        if self.ray_address is not None and self.executor != "ray":
            raise OptionsError("ray_address: only used with the ray executor")
        check_step_spec(self.steps)
        if not isinstance(self.wait, (bool, int, float)) or self.wait < 0:
            raise OptionsError(f"wait: True, False or seconds, got {self.wait!r}")


def build(source: Source, root: str | os.PathLike[str], options: BuildOptions | None = None) -> BuildSummary:
    """Convert the selected steps of ``source`` into the archive at ``root``.

    Args:
        source: where checkpoints come from.
        root: the archive folder (created).
        options: steps, parallelism, export settings.

    Returns:
        One outcome per selected step and the wall time.

    Raises:
        ExporterError: ``root`` holds files that are not an archive's (nothing is written
            there), or the first failing step, unless ``keep_going``. A build that fails
            before writing anything leaves no ``root`` behind.
        ArchiveLockedError: another process is writing ``root`` (see ``options.wait``).

    Example (a sample run written by ``neox-export sample runs/tiny``):
        >>> from exporter import BuildOptions, build, open_source
        >>> summary = build(open_source("runs/tiny"), "archive", BuildOptions(steps="0,8", quiet=True))
        >>> [(outcome.step, outcome.status) for outcome in summary.outcomes]
        [(0, 'done'), (8, 'done')]
        >>> again = build(open_source("runs/tiny"), "archive", BuildOptions(steps="0,8", quiet=True))
        >>> [outcome.status for outcome in again.outcomes]
        ['skipped', 'skipped']
    """
    options = options or BuildOptions()
    root = Path(root)
    _check_root(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        # Held from before the start-up clean-up: that clean-up removes partial steps, which
        # are another build's work in progress if one is running.
        with archive_lock(root, wait=options.wait, command=f"build from {source.uri}"):
            return _build(source, root, options)
    except BaseException:
        if created:
            _remove_if_empty(root)
        raise


def _check_root(root: Path) -> None:
    """Refuse a folder of the user's: the archive would be mixed into their files (and the
    clean-up of interrupted writes would run over them)."""
    if root.exists() and not root.is_dir():
        raise ExporterError(f"{root}: is a file; give a folder for the archive")
    foreign = [p.name for p in foreign_entries(root) if not is_temporary(p)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ExporterError(f"{root}: folder exists and holds files that are not an archive's "
                            f"({shown}); give a new or empty folder, or an archive to resume")


def _remove_if_empty(root: Path) -> None:
    """Remove ``root`` and the empty folders in it if no file but the lock was written (a
    failed start; the lock was released when the build stopped)."""
    lock = lock_path(root)
    if any(p.is_file() and p != lock for p in root.rglob("*")):
        return
    lock.unlink(missing_ok=True)
    for folder in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        folder.rmdir()
    root.rmdir()


def _build(source: Source, root: Path, options: BuildOptions) -> BuildSummary:
    start = time.perf_counter()
    manifest = Manifest(root, source.uri, options.export.manifest_entry())
    remove_temporaries(root)
    selected = parse_steps(options.steps, source.steps())
    if not selected:
        raise ExporterError(f"no steps selected from {source.uri} (selection {options.steps!r})")
    log.debug("%s: %d step(s) selected: %s", source.uri, len(selected), selected)
    outcomes: list[StepOutcome] = []
    todo = []
    for step in selected:
        if step_complete(root, step, verify=options.verify_existing):
            log.debug("step %d: complete in %s (%s), skipped", step, root,
                      "files re-hashed" if options.verify_existing else "file sizes checked")
            outcome = completed_outcome(root, step)
            outcomes.append(outcome)
            manifest.record(outcome)
            _report(options, outcome)
        else:
            todo.append(step)
    from tqdm import tqdm

    bar = tqdm(total=len(selected), initial=len(selected) - len(todo), desc="steps", unit="step",
               disable=True if options.quiet else None, dynamic_ncols=True)
    try:
        for outcome in _run(source, root, todo, options):
            outcomes.append(outcome)
            manifest.record(outcome)
            bar.update(1)
            _report(options, outcome)
            if outcome.status == "failed" and not options.keep_going:
                raise ExporterError(f"step {outcome.step}: {outcome.error}")
            if outcome.status == "done" and options.on_step_done is not None:
                options.on_step_done(outcome.step)
    finally:
        bar.close()
    outcomes.sort(key=lambda o: o.step)
    return BuildSummary(outcomes, time.perf_counter() - start)


def _report(options: BuildOptions, outcome: StepOutcome) -> None:
    """One line per finished step: a JSON event, or an INFO log line. A failed step is
    reported once, by whoever stops the build or prints its summary (BuildSummary.table),
    not here as well."""
    if options.log_json:
        print(json.dumps({"event": "step", **asdict(outcome)}), file=sys.stderr, flush=True)
    elif outcome.status != "failed":
        log.info("step %d %s (%d tensors, %.1f s)", outcome.step, outcome.status,
                 outcome.tensors, outcome.seconds)


def _run(source: Source, root: Path, steps: list[int], options: BuildOptions) -> Iterable[StepOutcome]:
    if not steps:
        return
    if options.executor == "ray":
        from exporter.pipeline.ray_executor import run_on_ray

        yield from run_on_ray(source, root, steps, options.export, options.ray_address,
                              safe_convert, max_in_flight=max(1, options.workers))
        return
    if options.workers <= 1:
        from exporter.pipeline.progress import byte_bar

        for step in steps:
            total = source.step_bytes(step)
            log.debug("step %d: converting %s bytes of source files", step, total)
            with byte_bar(f"step {step}", total=total, disable=options.quiet) as bar:
                outcome = safe_convert(source, step, root, options.export, bar)
            yield outcome
        return
    with ProcessPoolExecutor(max_workers=options.workers) as pool:
        pending: dict[Future[StepOutcome], int] = {}
        queue = list(steps)
        while queue or pending:
            while queue and len(pending) < options.workers:
                step = queue.pop(0)
                pending[pool.submit(safe_convert, source, step, root, options.export)] = step
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                step = pending.pop(fut)
                try:
                    yield fut.result()
                except Exception as exc:  # noqa: BLE001 - a crashed worker fails its step only
                    yield StepOutcome(step, "failed", error=f"worker crashed: {exc}")
