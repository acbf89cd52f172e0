"""Upload first, commit later: step files go to the dataset's storage before their commit.

``huggingface_hub.HfApi.preupload_lfs_files`` uploads the LFS content of commit operations
without committing them (DESIGN.md, "Facts about huggingface_hub 2.4 offline"); a later
``create_commit`` that names the same content only references it. ``upload_large_folder``
splits its work this way inside one process; here it splits it across processes and machines:
whoever converts a step (a Ray task on any node, or the upload thread of a local build)
uploads its tensor files at once and may delete them, and one coordinator commits whole steps
in batches (:class:`exporter.hub.publish.Publisher`), within the Hub's commit rate.

Only LFS content can travel ahead of its commit. Files the Hub stores as regular git blobs
(small JSON and YAML files) go inline in the commit payload, so they must reach the committer:
:func:`upload_step_files` returns them apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from exporter.errors import PublishError
from exporter.hub.calls import RetryPolicy, check_repo_id, hub_call
from exporter.hub.files import LocalFile

REPO_TYPE = "dataset"

T = TypeVar("T")


def _retried(what: str, repo_id: str, policy: RetryPolicy, fn: Callable[[], T]) -> T:
    """``fn`` with transient Hub errors retried; any other failure as a PublishError."""
    try:
        return hub_call(fn, what=f"{what} ({repo_id})", repo_id=repo_id, policy=policy,
                        error=PublishError, sleep=time.sleep)
    except PublishError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure is named, one line
        raise PublishError(f"could not {what} ({repo_id}): {exc}") from exc


def upload_step_files(api: Any, repo_id: str, revision: str, files: Sequence[LocalFile],
                      retry: RetryPolicy | None = None) -> tuple[list[LocalFile], list[LocalFile]]:
    """Upload the LFS content of ``files`` to ``repo_id`` without committing.

    Each file is hashed while its operation is made and checked against the sha256 the
    archive records (:meth:`LocalFile.operation`); content the repository's storage holds
    already is not sent again (the LFS batch API answers it without an upload action).

    Args:
        api: a ``huggingface_hub.HfApi``.
        repo_id: the target dataset (it and ``revision`` must exist).
        revision: the branch the commit will go to (the Hub checks write access on it).
        files: local files of one or more steps.
        retry: backoff for transient errors; an interrupted transfer resumes with the files
            not yet uploaded.

    Returns:
        The files now in the repository's storage, marked ``uploaded`` (a commit needs only
        their digests), and the files the Hub keeps as regular blobs, which must be committed
        with their content.

    Raises:
        PublishError: a file differs from its recorded sha256, or the Hub refused the upload.
    """
    check_repo_id(repo_id)
    policy = retry or RetryPolicy()
    todo = [f for f in files if not f.uploaded]
    operations: list[Any] = []
    # Files are hashed in a thread, one after the other, and whatever is hashed goes up in one
    # call (the client uploads a call's files on several threads, hiding per-request latency)
    # while the next files hash: the link stays busy. Each call is retried as a whole; an
    # operation already uploaded is marked and skipped (`preupload_lfs_files` filters on
    # `_is_uploaded`).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-hash") as hasher:
        waiting = [hasher.submit(f.operation) for f in todo]
        while waiting:
            group = [waiting.pop(0).result()]
            while waiting and waiting[0].done():
                group.append(waiting.pop(0).result())
            operations.extend(group)
            _retried("upload step files", repo_id, policy, lambda group=group: (
                api.preupload_lfs_files(repo_id, additions=group, repo_type=REPO_TYPE,
                                        revision=revision)))
    mode = {op.path_in_repo: op for op in operations}
    uploaded: list[LocalFile] = []
    regular: list[LocalFile] = []
    for f in files:
        op = mode.get(f.path)
        if f.uploaded or (op is not None and op._upload_mode == "lfs" and op._is_uploaded):
            uploaded.append(replace(f, uploaded=True))
        else:
            regular.append(f)
    return uploaded, regular
