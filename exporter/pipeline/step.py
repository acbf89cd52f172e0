"""One step of a build: fetch -> convert -> index, and how a step is found complete.

A step is converted into ``steps/step{N}`` (renamed into place when complete), then its two
index shards are written; it is complete when both shards exist and the files its checkpoint
row lists still have their recorded sizes and sha256s (or were removed after a verified push,
as ``.push/step{N}.json`` records). Whatever an interrupted attempt left is cleared before the
step is redone.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    push_state_path,
    step_dir,
    step_prefix,
    tensor_index_path,
)
from exporter.archive.push_state import deleted_after_push
from exporter.archive.trust import resolve_inside
from exporter.errors import ArchiveError, ExporterError
from exporter.files import file_sha256, is_temporary
from exporter.pipeline.export import ExportOptions, ExportResult, export_checkpoint
from exporter.records import StepOutcome
from exporter.sources import Source
from exporter.sources.base import FetchedCheckpoint

log = logging.getLogger(__name__)


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


def completed_outcome(root: Path, step: int) -> StepOutcome:
    """The outcome of a complete step found on disk (``skipped``), with the figures its
    checkpoint index recorded when it was converted, so a manifest that lacks the step (a
    build stopped between the index and the manifest) gets them rather than zeros."""
    row = pq.read_table(checkpoint_index_path(root, step)).to_pylist()[0]
    return StepOutcome(step, "skipped", tensors=int(row["tensors"] or 0),
                       bytes_out=int(row["bytes_out"] or 0), files=len(row["output_files"]),
                       revision=row["source_revision"])


def clear_step(root: Path, step: int) -> None:
    """Remove whatever an interrupted attempt at ``step`` left."""
    for path in (tensor_index_path(root, step), checkpoint_index_path(root, step),
                 push_state_path(root, step)):
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
        return convert_fetched(source, fetched, root, options, progress, start)


def convert_fetched(
    source: Source,
    fetched: FetchedCheckpoint,
    root: Path,
    options: ExportOptions,
    progress: Callable[[int], None] | None = None,
    start: float | None = None,
) -> StepOutcome:
    """Convert and index a step already fetched (a pipelined build fetches ahead)."""
    start = time.perf_counter() if start is None else start
    step = fetched.step
    clear_step(root, step)
    try:
        result = export_checkpoint(fetched.folder, step_dir(root, step), options, progress)
        _write_index(root, step, source, fetched, result, options, start)
    except BaseException:
        # Ctrl-C (or a failure) after the step's folder was renamed into place but before its
        # index was written: the step is left absent, not half-written.
        clear_step(root, step)
        raise
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
    prefix = step_prefix(step)
    write_tensor_index(tensor_index_path(root, step), tensor_rows(step, result.records, prefix))
    folder = step_dir(root, step)
    # Tensor files were hashed as they were written; only the small JSON/YAML files are read.
    outputs = [
        {"path": p.relative_to(root).as_posix(),
         "sha256": result.file_sha256.get(p.relative_to(folder).as_posix()) or file_sha256(p),
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
        "learning_rate_source": info.get("learning_rate_source"),
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


def safe_convert(
    source: Source,
    step: int,
    root: Path,
    options: ExportOptions,
    progress: Callable[[int], None] | None = None,
) -> StepOutcome:
    """:func:`convert_step`, with a failure recorded as the step's outcome (and whatever the
    attempt left removed) instead of raised: one step's failure does not stop a build."""
    try:
        return convert_step(source, step, root, options, progress)
    except Exception as exc:  # noqa: BLE001 - one step's unexpected failure must not stop a build
        return failed_step(root, step, exc)
    except BaseException:
        # Ctrl-C: leave the step absent, not half-written (its folder may already be in place
        # without its index); the interrupt goes on to end the build.
        clear_step(root, step)
        raise


def failed_step(root: Path, step: int, exc: Exception) -> StepOutcome:
    """The outcome of a step that raised ``exc``, with whatever it left cleared."""
    clear_step(root, step)
    if isinstance(exc, ExporterError):
        return StepOutcome(step, "failed", error=str(exc))
    log.error("step %d: unexpected error", step, exc_info=exc)
    return StepOutcome(step, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
