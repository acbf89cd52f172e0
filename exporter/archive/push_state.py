"""``.push/step{N}.json``: the local record of a step's files removed after a verified push.

``build --push-to ... --delete-after-push`` removes a step's safetensors files once the Hub
holds them with their sha256s, and records here, before removing anything, what it removed
and where it went. A build counts such a step as complete, and ``verify`` and the loader know
that its tensors live on the Hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.archive.layout import file_step, push_state_path
from exporter.archive.trust import check_relative, read_json
from exporter.errors import ArchiveError
from exporter.files import write_json_atomic


@dataclass(frozen=True)
class PushRecord:
    """Where a step's removed files went: the dataset, branch and commit that hold them."""

    repo_id: str
    repo_type: str
    revision: str
    commit: str | None
    deleted: dict[str, str]


def read_push_record(root: str | Path, step: int) -> PushRecord | None:
    """The push record of ``step``, None when none was written."""
    path = push_state_path(Path(root), step)
    if not path.is_file():
        return None
    data: Any = read_json(path, str(path))
    if not isinstance(data, dict):
        raise ArchiveError(f"{path}: a push record is a JSON object")
    deleted = data.get("deleted", {})
    if not isinstance(deleted, dict):
        raise ArchiveError(f"{path}: 'deleted' is not an object")
    for relative, sha256 in deleted.items():
        check_relative(relative, f"{path}: deleted")
        if not isinstance(sha256, str):
            raise ArchiveError(f"{path}: sha256 of {relative!r} is not text")
    commit = data.get("commit")
    return PushRecord(str(data.get("repo_id", "")), str(data.get("repo_type", "dataset")),
                      str(data.get("revision", "main")),
                      commit if isinstance(commit, str) else None, dict(deleted))


def deleted_after_push(root: str | Path, step: int) -> dict[str, str]:
    """Files of ``step`` removed after a verified push: relative path -> sha256 (may be empty).

    A build may count such a file as present when its checkpoint-index sha256 is the one
    recorded here, so a step pushed with ``--delete-after-push`` stays complete.
    """
    record = read_push_record(root, step)
    return record.deleted if record is not None else {}


def pushed_file(root: str | Path, relative: str) -> PushRecord | None:
    """The push record under which ``relative`` (``steps/step8/model.safetensors``) was
    removed after a verified push, None if it was not: the loader then reads it from
    ``repo_id`` at ``commit`` (or ``revision``)."""
    step = file_step(relative)
    record = read_push_record(root, step) if step is not None else None
    return record if record is not None and relative in record.deleted else None


def write_push_record(root: Path, step: int, record: PushRecord) -> None:
    """Record (atomically) what is about to be removed from ``step``."""
    write_json_atomic(push_state_path(root, step), {
        "repo_id": record.repo_id, "repo_type": record.repo_type, "revision": record.revision,
        "commit": record.commit, "deleted": dict(sorted(record.deleted.items()))})
