"""``build``: steps x (fetch -> convert -> index), resumable, on local processes or Ray.

Each step is converted into ``steps/step{N}`` (renamed into place when complete), then its
two index shards are written; a step is complete when both shards exist and the files its
checkpoint row lists still have their recorded sizes and sha256s. Re-running a build skips
complete steps and redoes the rest, so a build killed at any point converges to the same
archive. Only the coordinating process writes ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from exporter import __version__
from exporter.archive.index import (
    dtype_name,
    tensor_rows,
    write_checkpoint_index,
    write_tensor_index,
)
from exporter.archive.layout import (
    checkpoint_index_path,
    is_temporary,
    step_dir,
    tensor_index_path,
)
from exporter.archive.manifest import Manifest
from exporter.archive.trust import resolve_inside
from exporter.errors import ArchiveError, ExporterError
from exporter.export import ExportOptions, ExportResult, export_checkpoint
from exporter.sources import Source
from exporter.sources.base import FetchedCheckpoint
from exporter.sources.local import file_sha256
from exporter.steps import parse_steps

log = logging.getLogger(__name__)

#: What happened to a step: converted now, found complete, or failed (with a reason).
StepStatus = Literal["done", "skipped", "failed"]


@dataclass
class BuildOptions:
    """How to build an archive.

    Attributes:
        export: what each step writes.
        steps: a step selection (see :func:`exporter.steps.parse_steps`), None for all.
        workers: steps converted in parallel (local processes).
        executor: ``local`` or ``ray``.
        ray_address: Ray cluster address (None starts or joins a local one).
        keep_going: a failing step is recorded and the others continue.
        verify_existing: re-hash complete steps' files before skipping them.
        on_step_done: called in the coordinating process after each finished step
            (publishing hooks in here).
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


@dataclass
class StepOutcome:
    """What happened to one step."""

    step: int
    status: StepStatus
    tensors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    revision: str | None = None
    files: int = 0
    error: str | None = None


@dataclass
class BuildSummary:
    outcomes: list[StepOutcome]
    seconds: float

    def count(self, status: StepStatus) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def bytes_in(self) -> int:
        return sum(o.bytes_in for o in self.outcomes if o.status == "done")

    @property
    def bytes_out(self) -> int:
        return sum(o.bytes_out for o in self.outcomes if o.status == "done")

    def table(self) -> str:
        done = [o for o in self.outcomes if o.status == "done"]
        rate = self.bytes_in / self.seconds / 1e9 if self.seconds > 0 else 0.0
        lines = [
            f"{'steps done':<16}{len(done)}",
            f"{'steps skipped':<16}{self.count('skipped')} (already complete)",
            f"{'steps failed':<16}{self.count('failed')}",
            f"{'tensors':<16}{sum(o.tensors for o in done)}",
            f"{'GB in':<16}{self.bytes_in / 1e9:.3f}",
            f"{'GB out':<16}{self.bytes_out / 1e9:.3f}",
            f"{'GB/s (in)':<16}{rate:.3f}",
            f"{'time':<16}{self.seconds:.1f} s",
        ]
        for o in self.outcomes:
            if o.status == "failed":
                lines.append(f"failed step {o.step}: {o.error}")
        return "\n".join(lines)


def step_complete(root: Path, step: int, verify: bool = True) -> bool:
    """Both index shards exist and every output file has its recorded size (and sha256)."""
    cpath = checkpoint_index_path(root, step)
    if not (cpath.exists() and tensor_index_path(root, step).exists()):
        return False
    try:
        rows = pq.read_table(cpath).to_pylist()
    except Exception:  # noqa: BLE001 - an unreadable shard means the step is not complete
        return False
    if len(rows) != 1:
        return False
    from exporter.publish import deleted_after_push

    pushed = deleted_after_push(root, step)
    for entry in rows[0]["output_files"]:
        try:
            path = resolve_inside(root, entry["path"], str(cpath))
        except ArchiveError:
            return False  # a path out of the archive: the step is rebuilt, nothing is read
        if not path.exists() and pushed.get(entry["path"]) == entry["sha256"]:
            continue  # on the Hub, removed locally by --delete-after-push
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
        if verify and file_sha256(path) != entry["sha256"]:
            return False
    return True


def clear_step(root: Path, step: int) -> None:
    """Remove whatever an interrupted attempt at ``step`` left."""
    for path in (tensor_index_path(root, step), checkpoint_index_path(root, step),
                 root / ".push" / f"step{step}.json"):
        path.unlink(missing_ok=True)
    shutil.rmtree(step_dir(root, step), ignore_errors=True)
    parent = step_dir(root, step).parent
    if parent.is_dir():
        for leftover in parent.iterdir():
            if is_temporary(leftover) and leftover.name.startswith(f".step{step}."):
                shutil.rmtree(leftover, ignore_errors=True)


def remove_temporaries(root: Path) -> int:
    """Delete temporaries of interrupted writes anywhere in the archive; returns how many."""
    count = 0
    for path in sorted(root.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if is_temporary(path) and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            count += 1
    return count


def convert_step(
    source: Source,
    step: int,
    root: Path,
    options: ExportOptions,
    progress: Callable[[int], None] | None = None,
) -> StepOutcome:
    """Fetch, convert and index one step (runs in a worker process or Ray task)."""
    start = time.perf_counter()
    clear_step(root, step)
    with source.fetch(step) as fetched:
        result = export_checkpoint(fetched.folder, step_dir(root, step), options, progress)
        _write_index(root, step, source, fetched, result, options, start)
    return StepOutcome(
        step=step,
        status="done",
        tensors=len(result.records),
        bytes_in=result.bytes_in,
        bytes_out=result.bytes_out,
        seconds=time.perf_counter() - start,
        revision=fetched.revision,
        files=sum(1 for p in step_dir(root, step).rglob("*") if p.is_file()),
    )


def _write_index(
    root: Path,
    step: int,
    source: Source,
    fetched: FetchedCheckpoint,
    result: ExportResult,
    options: ExportOptions,
    start: float,
) -> None:
    prefix = f"steps/step{step}"
    write_tensor_index(tensor_index_path(root, step), tensor_rows(step, result.records, prefix))
    folder = step_dir(root, step)
    # Tensor files were hashed as they were written; only the small JSON/YAML files are read.
    outputs = [
        {"path": str(p.relative_to(root)),
         "sha256": result.file_sha256.get(str(p.relative_to(folder))) or file_sha256(p),
         "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    source_files = [{"path": f.path, "sha256": f.sha256, "bytes": f.size}
                    for f in fetched.source_files()]
    engine = result.engine
    optim = result.optimizer
    info = optim.summary if optim is not None else {}
    row = {
        "step": step,
        "iteration": _int(engine.iteration),
        "samples": _int(engine.value("global_samples")),
        "skipped_steps": _int(engine.value("skipped_steps")),
        "learning_rate": info.get("learning_rate"),
        "loss_scale": info.get("loss_scale"),
        "adam_step": _int(info.get("adam_step")),
        "adam_step_source": info.get("adam_step_source"),
        "dp_size": optim.dp_size if optim is not None else _int(engine.value("dp_world_size"), 32),
        "tp_size": result.model.tp_size,
        "pp_size": info.get("pp_size"),
        "format": optim.format if optim is not None else "model-only",
        "model_dtype": dtype_name(result.model.dtype),
        "output_dtype": dtype_name(options.dtype or result.model.dtype),
        "include": list(options.include),
        "source": source.uri,
        "source_revision": fetched.revision,
        "source_files": source_files,
        "output_files": outputs,
        "tensors": len(result.records),
        "bytes_in": result.bytes_in,
        "bytes_out": sum(o["bytes"] for o in outputs),
        "seconds": time.perf_counter() - start,
        "tool_version": __version__,
    }
    write_checkpoint_index(checkpoint_index_path(root, step), row)


def _int(value: Any, bits: int = 64) -> int | None:
    """An int column value, or None for anything else (a Parquet intN cannot hold more)."""
    limit = 2 ** (bits - 1)
    if isinstance(value, int) and not isinstance(value, bool) and -limit <= value < limit:
        return value
    return None


def build(source: Source, root: str | os.PathLike[str], options: BuildOptions | None = None) -> BuildSummary:
    """Convert the selected steps of ``source`` into the archive at ``root``.

    Args:
        source: where checkpoints come from.
        root: the archive folder (created).
        options: steps, parallelism, export settings.

    Returns:
        One outcome per selected step and the wall time.

    Raises:
        ExporterError: on the first failing step, unless ``keep_going``.
    """
    options = options or BuildOptions()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest = Manifest(root, source.uri, options.export)
    remove_temporaries(root)
    selected = parse_steps(options.steps, source.steps())
    if not selected:
        raise ExporterError(f"no steps selected from {source.uri} (selection {options.steps!r})")
    outcomes: list[StepOutcome] = []
    todo = []
    for step in selected:
        if step_complete(root, step, verify=options.verify_existing):
            outcome = StepOutcome(step, "skipped", revision=None)
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
    if options.log_json:
        print(json.dumps({"event": "step", **asdict(outcome)}), file=sys.stderr, flush=True)
    elif outcome.status == "failed":
        log.error("step %d failed: %s", outcome.step, outcome.error)
    else:
        log.info("step %d %s (%d tensors, %.1f s)", outcome.step, outcome.status,
                 outcome.tensors, outcome.seconds)


def _safe_convert(
    source: Source,
    step: int,
    root: Path,
    options: ExportOptions,
    progress: Callable[[int], None] | None = None,
) -> StepOutcome:
    try:
        return convert_step(source, step, root, options, progress)
    except ExporterError as exc:
        clear_step(root, step)
        return StepOutcome(step, "failed", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one step's unexpected failure must not stop a build
        log.exception("step %d: unexpected error", step)
        clear_step(root, step)
        return StepOutcome(step, "failed", error=f"internal error: {type(exc).__name__}: {exc}")


def _run(source: Source, root: Path, steps: list[int], options: BuildOptions) -> Iterable[StepOutcome]:
    if not steps:
        return
    if options.executor == "ray":
        from exporter.ray_executor import run_on_ray

        yield from run_on_ray(source, root, steps, options.export, options.ray_address,
                              _safe_convert, max_in_flight=max(1, options.workers))
        return
    if options.executor != "local":
        raise ExporterError(f"unknown executor {options.executor!r} (local or ray)")
    if options.workers <= 1:
        from exporter.progress import byte_bar

        for step in steps:
            with byte_bar(f"step {step}", total=source.step_bytes(step), disable=options.quiet) as bar:
                outcome = _safe_convert(source, step, root, options.export, bar)
            yield outcome
        return
    with ProcessPoolExecutor(max_workers=options.workers) as pool:
        pending: dict[Future[StepOutcome], int] = {}
        queue = list(steps)
        while queue or pending:
            while queue and len(pending) < options.workers:
                step = queue.pop(0)
                pending[pool.submit(_safe_convert, source, step, root, options.export)] = step
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                step = pending.pop(fut)
                try:
                    yield fut.result()
                except Exception as exc:  # noqa: BLE001 - a crashed worker fails its step only
                    yield StepOutcome(step, "failed", error=f"worker crashed: {exc}")
