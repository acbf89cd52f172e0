"""Files on both sides of a push: what the Hub lists (:class:`RemoteFile`), what an archive
holds (:class:`LocalFile`), and how to tell whether they are the same content.

The Hub lists every file of a commit with its size and git blob id, and LFS files (the Hub
keeps files of 10 MiB and more in LFS) with the sha256 of their content as well
(``HfApi.list_repo_tree`` / ``get_paths_info``: ``RepoFile.blob_id``, ``RepoFile.lfs.sha256``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.archive.layout import checkpoint_index_path, tensor_index_path
from exporter.archive.trust import resolve_inside
from exporter.archive.validate import read_shard
from exporter.errors import PublishError
from exporter.files import file_sha256, git_blob_id


@dataclass(frozen=True)
class RemoteFile:
    """A file as the Hub lists it at a commit.

    Attributes:
        path: path in the repository.
        size: bytes.
        blob_id: git blob sha1 (of the LFS pointer for LFS files).
        sha256: sha256 of the content for LFS files, None for regular files.
    """

    path: str
    size: int
    blob_id: str
    sha256: str | None = None

    @classmethod
    def of_entry(cls, entry: Any) -> RemoteFile:
        """From a huggingface_hub ``RepoFile``."""
        return cls(entry.path, entry.size, entry.blob_id,
                   entry.lfs.sha256 if entry.lfs is not None else None)


@dataclass(frozen=True)
class LocalFile:
    """A file to publish: a file of the archive, or ``data`` held in memory.

    ``sha256`` is the digest the archive records (checkpoint index ``output_files``).
    ``uploaded``: the content already sits in the dataset's LFS storage (uploaded without a
    commit, :mod:`exporter.hub.upload`), so a commit references it by sha256 and size and the
    local file is neither needed nor read again.
    """

    path: str
    local: Path | None
    sha256: str
    size: int
    data: bytes | None = None
    uploaded: bool = False

    @classmethod
    def of_bytes(cls, path: str, data: bytes) -> LocalFile:
        return cls(path, None, hashlib.sha256(data).hexdigest(), len(data), data)

    def exists(self) -> bool:
        return self.data is not None or (self.local is not None and self.local.is_file())

    def content(self) -> bytes | None:
        """The bytes (read from disk for archive files), None when the file is gone."""
        if self.data is not None:
            return self.data
        return self.local.read_bytes() if self.local is not None and self.local.is_file() else None

    def matches(self, remote: RemoteFile | None) -> bool:
        """Whether the remote holds this content (LFS sha256, or git blob id of regular files)."""
        if remote is None or remote.size != self.size:
            return False
        if remote.sha256 is not None:
            return remote.sha256 == self.sha256
        content = self.content()  # regular files are small: the Hub stores >= 10 MiB in LFS
        return content is not None and git_blob_id(content) == remote.blob_id

    def operation(self) -> Any:
        """The huggingface_hub ``CommitOperationAdd`` of this file, checked against ``sha256``."""
        from huggingface_hub import CommitOperationAdd

        if self.uploaded:
            return uploaded_operation(self.path, self.sha256, self.size)
        if self.data is not None:
            return CommitOperationAdd(path_in_repo=self.path, path_or_fileobj=self.data)
        if not self.exists():
            raise PublishError(f"{self.local}: missing here, and not on the remote")
        operation = CommitOperationAdd(path_in_repo=self.path, path_or_fileobj=str(self.local))
        # huggingface_hub hashes every file it uploads: a free check against the index.
        if operation.upload_info.sha256.hex() != self.sha256:
            raise PublishError(f"{self.local}: content differs from the sha256 in the index "
                               f"(changed since the build?)")
        return operation


def uploaded_operation(path: str, sha256: str, size: int) -> Any:
    """A ``CommitOperationAdd`` for LFS content already uploaded: the commit names it only.

    ``huggingface_hub.HfApi.create_commit`` sends an LFS file as ``{"path", "algo": "sha256",
    "oid", "size"}`` and uploads nothing for an operation marked ``_is_uploaded``
    (``_commit_api._prepare_commit_payload``, ``hf_api.preupload_lfs_files``); this is how
    ``upload_large_folder`` commits what its workers uploaded. The content is not needed, so
    the operation carries empty bytes and the recorded digest. The Hub refuses the commit if
    the object is not in the repository's storage.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    operation = CommitOperationAdd(path_in_repo=path, path_or_fileobj=b"")
    operation.upload_info = UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(sha256))
    operation._upload_mode = "lfs"
    operation._is_uploaded = True
    return operation


def step_files(root: Path, step: int) -> list[LocalFile]:
    """Every file of one step: its output files (sha256 from the checkpoint index) and shards.

    Every path is archive content: validated, and resolved inside the root
    (:mod:`exporter.archive.trust`), so a push never uploads, and ``--delete-after-push`` never
    removes, a file outside the archive.
    """
    shards = {p.relative_to(root).as_posix(): p
              for p in (tensor_index_path(root, step), checkpoint_index_path(root, step))}
    if not all(p.is_file() for p in shards.values()):
        raise PublishError(f"{root}: step {step} has no index shards; build it first")
    real = {relative: resolve_inside(root, relative, str(root)) for relative in shards}
    tables = {relative: read_shard(path, f"{root}/{relative}") for relative, path in real.items()}
    checkpoints = checkpoint_index_path(root, step).relative_to(root).as_posix()
    rows = tables[checkpoints].to_pylist()
    label = f"{root}/{checkpoints}"
    if len(rows) != 1:
        raise PublishError(f"{label}: expected one row, found {len(rows)}")
    files = [LocalFile(e["path"], resolve_inside(root, e["path"], f"{label} output_files"),
                       e["sha256"], e["bytes"])
             for e in rows[0]["output_files"]]
    files += [LocalFile(relative, path, file_sha256(path), path.stat().st_size)
              for relative, path in real.items()]
    return files
