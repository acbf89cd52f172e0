"""A step built on another machine: fetch, convert and upload there, index here.

With ``--executor ray --push-to ORG/NAME`` no storage is shared. :func:`build_and_upload`
runs as a Ray task on any node: it fetches its step (a Hub branch, or a path that node can
see) into a scratch folder of its own, converts it there, uploads the tensor files to the
target dataset's storage without committing (:mod:`exporter.hub.upload`), deletes its
scratch folder and returns a :class:`~exporter.records.StepUpload`: the outcome, the uploaded
files' paths, sizes and sha256s, and the bytes of the small files and index shards.
:func:`adopt_step` writes those into the coordinator's archive, with a ``.push/step{N}.json``
record of the uploaded files, so the step is complete there exactly as a local build that
pushed and removed its tensor files leaves it; the coordinator alone writes index shards and
manifest and commits (:class:`exporter.hub.uploader.StepUploader`).

The scratch folder is ``<scratch>/neox-exporter/step{N}`` (``scratch`` from the task,
``NEOX_EXPORTER_SCRATCH`` on the node, or the system's temporary folder): an attempt first
clears what an earlier attempt on that node left (a worker killed mid-step leaves its folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path, PurePosixPath

from exporter.archive.layout import checkpoint_index_file, tensor_index_file
from exporter.archive.push_state import PushRecord, write_push_record
from exporter.errors import ExporterError
from exporter.files import write_bytes_atomic
from exporter.hub.files import step_files
from exporter.hub.upload import REPO_TYPE, upload_step_files
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.step import clear_step, safe_convert
from exporter.records import StepOutcome, StepUpload, UploadedFile, UploadTarget
from exporter.sources import Source

SCRATCH_ENV = "NEOX_EXPORTER_SCRATCH"


def scratch_folder(step: int, scratch: str | None = None) -> Path:
    """Where this node works on ``step``."""
    base = scratch or os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()
    return Path(base) / "neox-exporter" / f"step{step}"


def build_and_upload(source: Source, step: int, options: ExportOptions, target: UploadTarget,
                     scratch: str | None = None) -> StepUpload:
    """Fetch, convert and upload one step on this node; nothing stays on its disk.

    A step that fails for its own reasons comes back ``failed`` with the reason; only the
    death of the process or node raises (Ray retries the task elsewhere).
    """
    from huggingface_hub import HfApi

    from exporter import __version__
    from exporter.hub.source import HubSource

    work = scratch_folder(step, scratch)
    shutil.rmtree(work, ignore_errors=True)
    root = work / "archive"
    if isinstance(source, HubSource):
        source = source.with_download_dir(work / "downloads")
    try:
        outcome = safe_convert(source, step, root, options)
        if outcome.status != "done":
            return StepUpload(outcome)
        try:
            files = step_files(root, step)
            shards = {tensor_index_file(step), checkpoint_index_file(step)}
            api = HfApi(library_name="neox-exporter", library_version=__version__)
            uploaded, regular = upload_step_files(
                api, target.repo_id, target.revision, [f for f in files if f.path not in shards])
            small = {f.path: (root / f.path).read_bytes() for f in regular}
            small.update({path: (root / path).read_bytes() for path in sorted(shards)})
        except ExporterError as exc:
            return StepUpload(replace(outcome, status="failed", error=str(exc)))
        return StepUpload(outcome, tuple(UploadedFile(f.path, f.sha256, f.size) for f in uploaded),
                          small)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def adopt_step(root: Path, result: StepUpload, target: UploadTarget) -> StepOutcome:
    """Write a worker's step into the coordinator's archive; returns its outcome.

    Small files first, then the push record of the uploaded files, then the index shards: the
    step counts as complete (:func:`exporter.pipeline.step.step_complete`) only when all are
    in place.
    """
    outcome = result.outcome
    if outcome.status != "done":
        return outcome
    step = outcome.step
    small = dict(result.small_files or {})
    shards = [tensor_index_file(step), checkpoint_index_file(step)]
    missing = [path for path in shards if path not in small]
    if missing:
        return replace(outcome, status="failed", error=f"worker returned no {missing[0]}")
    clear_step(root, step)
    for path in [p for p in small if p not in shards]:
        write_bytes_atomic(root / _relative(path), small[path])
    write_push_record(root, step, PushRecord(target.repo_id, REPO_TYPE, target.revision, None,
                                             {f.path: f.sha256 for f in result.uploaded}))
    for path in shards:
        write_bytes_atomic(root / _relative(path), small[path])
    return outcome


def _relative(path: str) -> PurePosixPath:
    """An archive path from a worker, refused if it could leave the archive."""
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ExporterError(f"worker returned an archive path outside the archive: {path!r}")
    return relative
