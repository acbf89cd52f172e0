"""``build``: steps x (fetch -> convert -> index -> upload), resumable, locally or on Ray.

Each step runs :func:`exporter.pipeline.step.convert_step`; complete steps are skipped, so a build
killed at any point converges to the same archive. Only the coordinating process writes
``manifest.json``, the index shards of steps built elsewhere, and commits.

A local build with one worker is a pipeline (:mod:`exporter.pipeline.pipelined`: fetch ahead,
upload behind, within ``max_disk``); with ``push_to`` and the Ray executor, tasks convert and
upload on their own nodes (:mod:`exporter.pipeline.remote`) and no storage is shared.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.archive.layout import foreign_entries, lock_path
from exporter.archive.lock import archive_lock
from exporter.archive.manifest import Manifest
from exporter.errors import ExporterError, OptionsError
from exporter.files import is_temporary
from exporter.hub.calls import check_repo_id
from exporter.hub.uploader import StepUploader
from exporter.neox.checkpoint import scan_checkpoint
from exporter.neox.zero import forked_reading
from exporter.pipeline.disk import DiskBudget, StepNeed
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.pipelined import hand_on, plan_step, run_pipelined
from exporter.pipeline.progress import byte_bar, step_bar
from exporter.pipeline.step import (
    completed_outcome,
    failed_step,
    remove_temporaries,
    safe_convert,
    step_complete,
)
from exporter.pipeline.steps import check_step_spec, parse_steps
from exporter.pipeline.summary import BuildSummary
from exporter.records import StepOutcome, UploadTarget
from exporter.sources import Source
from exporter.torchfile.forked import kept_reader

if TYPE_CHECKING:
    from exporter.hub.publish import PushEvent

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
        push_to: publish to this Hub dataset (``ORG/NAME``) as the build goes: every step's
            files are uploaded when converted, whole steps committed in batches.
        push_revision: the dataset branch (``main`` when None).
        steps_per_commit: steps per commit (the Hub allows about 128 commits per hour).
        delete_after_push: remove a step's tensor files once uploaded (before its commit).
        on_push_event: called with each :class:`exporter.hub.publish.PushEvent`.
        max_disk: bytes the build may hold at once: downloads, steps converting and converted
            steps waiting for upload (:mod:`exporter.pipeline.disk`); None for no bound.
        scratch_dir: Ray tasks' working folder on each node (default ``NEOX_EXPORTER_SCRATCH``
            or the node's temporary folder).
        push_token: Hub token for the push (``HF_TOKEN`` or the saved login when None).
        push_license: the dataset card's license (None: the source model's, else unknown).
        push_force: push even into a dataset built from another source or options.
        push_model_repo: the run's model repository, linked from the dataset card.

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
    push_to: str | None = None
    push_revision: str | None = None
    steps_per_commit: int = 10
    delete_after_push: bool = False
    on_push_event: Callable[[PushEvent], None] | None = None
    max_disk: int | None = None
    scratch_dir: str | None = None
    push_token: str | None = None
    push_license: str | None = None
    push_force: bool = False
    push_model_repo: str | None = None

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
        if self.push_to is not None:
            check_repo_id(self.push_to)
        elif self.delete_after_push:
            raise OptionsError("delete_after_push: needs push_to")
        if not isinstance(self.steps_per_commit, int) or self.steps_per_commit < 1:
            raise OptionsError(f"steps_per_commit: must be at least 1, got {self.steps_per_commit!r}")
        if self.max_disk is not None and (not isinstance(self.max_disk, int) or self.max_disk <= 0):
            raise OptionsError(f"max_disk: must be a positive number of bytes, got {self.max_disk!r}")


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
        with archive_lock(root, wait=options.wait, command=f"build from {source.uri}"), \
                _reader_for(source, options):
            return _build(source, root, options)
    except BaseException:
        if created:
            _remove_if_empty(root)
        raise


def _reader_for(source: Source, options: BuildOptions) -> AbstractContextManager[object]:
    """A forked reader of partition pickles for the steps this process converts, forked now,
    before the build's threads start (:func:`exporter.torchfile.forked.kept_reader`).

    Only where steps may share their files with it: a local step whose partition pickles are
    small (the Pythia layout), or rebuilt from one read (one unit, one pickle but for
    numbers), says the run's are, and then nothing is forked (a fork costs the build about
    0.3 s of copy-on-write faults, measured on a run of five tiny steps). Steps fetched from
    elsewhere are not known yet: the reader is forked for them.
    """
    if not (options.executor == "local" and options.workers <= 1
            and "optimizer" in options.export.include):
        return nullcontext()
    try:
        selected = parse_steps(options.steps, source.steps())
        folder = source.local_folder(selected[0]) if selected else None
        if folder is not None and forked_reading(scan_checkpoint(folder)) is None:
            return nullcontext()
    except ExporterError:  # the build reports it: a reader forked meanwhile costs little
        pass
    return kept_reader()


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
    uploader = _uploader(root, options, manifest.data)
    if uploader is not None:
        from exporter.hub.restore import restore_committed_steps

        restore_committed_steps(uploader.publisher, [
            s for s in selected if not step_complete(root, s, verify=False)])
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
    bar = step_bar(len(selected), len(selected) - len(todo), disable=options.quiet)
    budget = DiskBudget(options.max_disk)
    pushed = None
    try:
        if uploader is not None:
            uploader.start()
        for outcome in _run(source, root, todo, options, uploader, budget):
            outcomes.append(outcome)
            manifest.record(outcome)
            bar.update(1)
            _report(options, outcome)
            if outcome.status == "failed" and not options.keep_going:
                raise ExporterError(f"step {outcome.step}: {outcome.error}")
            if outcome.status == "done" and options.on_step_done is not None:
                options.on_step_done(outcome.step)
        if uploader is not None:
            pushed = uploader.finish()
    except BaseException:
        if uploader is not None:
            uploader.abort()
        raise
    finally:
        bar.close()
    outcomes.sort(key=lambda o: o.step)
    return BuildSummary(outcomes, time.perf_counter() - start, pushed, budget.peak)


def _uploader(root: Path, options: BuildOptions, run: dict[str, Any]) -> StepUploader | None:
    """The upload stage of a build that pushes (not started yet); ``run`` is the manifest
    being built, which a remote archive of another run must not be mixed with."""
    if options.push_to is None:
        return None
    from exporter.hub.publish import Publisher

    publisher = Publisher(
        root, options.push_to, revision=options.push_revision, token=options.push_token,
        steps_per_commit=options.steps_per_commit, delete_after_push=options.delete_after_push,
        license=options.push_license, force=options.push_force,
        model_repo=options.push_model_repo, progress=options.on_push_event)
    publisher.run = run
    return StepUploader(publisher)


def _report(options: BuildOptions, outcome: StepOutcome) -> None:
    """One line per finished step: a JSON event, or an INFO log line. A failed step is
    reported once, by whoever stops the build or prints its summary (BuildSummary.table),
    not here as well."""
    if options.log_json:
        print(json.dumps({"event": "step", **asdict(outcome)}), file=sys.stderr, flush=True)
    elif outcome.status != "failed":
        log.info("step %d %s (%d tensors, %.1f s)", outcome.step, outcome.status,
                 outcome.tensors, outcome.seconds)


def _run(source: Source, root: Path, steps: list[int], options: BuildOptions,
         uploader: StepUploader | None, budget: DiskBudget) -> Iterable[StepOutcome]:
    if not steps:
        return
    if options.executor == "ray":
        yield from _run_ray(source, root, steps, options, uploader)
        return
    if options.workers <= 1:
        yield from run_pipelined(
            source, root, steps, options.export, budget, uploader,
            lambda step, total: byte_bar(f"step {step}", total=total, disable=options.quiet))
        return
    yield from _run_pool(source, root, steps, options, uploader, budget)


def _run_pool(source: Source, root: Path, steps: list[int], options: BuildOptions,
              uploader: StepUploader | None, budget: DiskBudget) -> Iterable[StepOutcome]:
    """Steps in worker processes, as many at once as ``workers`` and ``max_disk`` allow."""
    needs: dict[int, tuple[StepNeed, int]] = {}
    with ProcessPoolExecutor(max_workers=options.workers) as pool:
        pending: dict[Future[StepOutcome], int] = {}
        queue = list(steps)
        while queue or pending:
            while queue and len(pending) < options.workers:
                step = queue[0]
                if step not in needs:
                    try:
                        needs[step] = plan_step(source, step, options.export, budget)
                    except Exception as exc:  # noqa: BLE001 - the step fails, named
                        queue.pop(0)
                        yield failed_step(root, step, exc)
                        continue
                # With steps running, wait for one to end rather than block on the budget;
                # with none, wait for the uploads to give disk back.
                if pending and not budget.try_reserve(needs[step][0].total):
                    break
                if not pending:
                    budget.reserve(needs[step][0].total)
                queue.pop(0)
                pending[pool.submit(safe_convert, source, step, root, options.export)] = step
            if not pending:
                continue
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                step = pending.pop(fut)
                try:
                    outcome = fut.result()
                except Exception as exc:  # noqa: BLE001 - a crashed worker fails its step only
                    outcome = StepOutcome(step, "failed", error=f"worker crashed: {exc}")
                need, size = needs.pop(step)
                budget.release(need.download)
                yield from hand_on(outcome, need, size, budget, uploader)


def _run_ray(source: Source, root: Path, steps: list[int], options: BuildOptions,
             uploader: StepUploader | None) -> Iterable[StepOutcome]:
    """Ray tasks: with an uploader each converts and uploads on its own node (no shared
    storage); without, each writes into the archive folder (shared storage)."""
    from exporter.pipeline.ray_executor import run_on_ray

    gpu = options.export.device.startswith("cuda")
    in_flight = max(1, options.workers)
    if uploader is None:
        for _, outcome in run_on_ray(steps, safe_convert,
                                     lambda step: (source, step, root, options.export),
                                     options.ray_address, gpu, in_flight):
            yield outcome
        return
    from exporter.pipeline.remote import adopt_step, build_and_upload

    publisher = uploader.publisher
    target = UploadTarget(publisher.repo_id, publisher.revision)
    for _, result in run_on_ray(
            steps, build_and_upload,
            lambda step: (source, step, options.export, target, options.scratch_dir),
            options.ray_address, gpu, in_flight):
        outcome = result if isinstance(result, StepOutcome) else adopt_step(root, result, target)
        yield outcome
        if outcome.status == "done":
            uploader.submit(outcome.step)
