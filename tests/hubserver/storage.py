"""Git-like repository store behind the test Hub server.

Repositories (keyed by type and id) hold branches and tags pointing at commits; each commit is
a full snapshot (path -> file entry, see :mod:`snapshot`) with a parent, a title and a
description. File contents live once in a content-addressed object store named by sha256.

Every public method takes the store lock, so HTTP handler threads and test code can share it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

from .errors import (
    Conflict,
    EntryNotFound,
    PreconditionFailed,
    RepoNotFound,
    RevisionNotFound,
    Unprocessable,
)
from .snapshot import Commit, FileEntry, fingerprint, git_blob_id, lfs_pointer, now_iso

# The patterns of the `.gitattributes` the Hub writes into every new repository.
DEFAULT_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet",
    "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar",
    "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip

# The Hub stores files of 10 MiB and more with LFS whatever their name.
DEFAULT_LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LfsPolicy:
    """Which files the server stores with LFS: by name pattern, by size, or when binary."""

    patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS
    size_threshold: int = DEFAULT_LFS_SIZE_THRESHOLD

    def is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        """Whether a file of this path, size and first bytes goes to LFS (empty files never)."""
        if size == 0:
            return False
        name = PurePosixPath(path).name
        return (
            any(fnmatch.fnmatch(name, pattern) for pattern in self.patterns)
            or size >= self.size_threshold
            or b"\0" in sample
        )

    def gitattributes(self) -> bytes:
        """The `.gitattributes` content declaring the LFS patterns."""
        lines = [f"{pattern} filter=lfs diff=lfs merge=lfs -text" for pattern in self.patterns]
        return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class AddFile:
    """Commit operation: put the stored object ``sha256`` at ``path``."""

    path: str
    sha256: str
    lfs: bool


@dataclass(frozen=True)
class DeleteFile:
    """Commit operation: remove the file at ``path`` (it must exist)."""

    path: str


@dataclass(frozen=True)
class DeleteFolder:
    """Commit operation: remove every file under ``path`` (at least one must exist)."""

    path: str


CommitOperation = AddFile | DeleteFile | DeleteFolder


@dataclass
class Repo:
    """A repository: refs, commits and the LFS objects attached to it."""

    repo_type: str
    repo_id: str
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class HubStore:
    """Repositories, refs, commits and the object store, under one lock."""

    def __init__(self, root: Path, lfs_policy: LfsPolicy | None = None) -> None:
        self.root = root
        self.objects_dir = root / "objects"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.lfs_policy = lfs_policy or LfsPolicy()
        self.lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._sizes: dict[str, int] = {}
        self._commit_counter = itertools.count()

    # -- objects -------------------------------------------------------------------------

    def object_path(self, sha256: str) -> Path:
        """Where the object of this sha256 lives (it may not exist)."""
        return self.objects_dir / sha256[:2] / sha256

    def has_object(self, sha256: str) -> bool:
        with self.lock:
            return sha256 in self._sizes

    def object_size(self, sha256: str) -> int:
        with self.lock:
            return self._sizes[sha256]

    def read_object(self, sha256: str) -> bytes:
        return self.object_path(sha256).read_bytes()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        with self.lock:
            if sha256 not in self._sizes:
                target = self.object_path(sha256)
                target.parent.mkdir(exist_ok=True)
                target.write_bytes(data)
                self._sizes[sha256] = len(data)
        return sha256

    def put_stream(self, stream: Readable) -> tuple[str, int]:
        """Store everything ``stream`` yields; return (sha256, size)."""
        digest = hashlib.sha256()
        size = 0
        with tempfile.NamedTemporaryFile(dir=self.objects_dir, delete=False) as tmp:
            while chunk := stream.read(_COPY_CHUNK):
                digest.update(chunk)
                tmp.write(chunk)
                size += len(chunk)
        sha256 = digest.hexdigest()
        with self.lock:
            if sha256 in self._sizes:
                Path(tmp.name).unlink()
            else:
                target = self.object_path(sha256)
                target.parent.mkdir(exist_ok=True)
                Path(tmp.name).replace(target)
                self._sizes[sha256] = size
        return sha256, size

    def put_file(self, path: Path) -> str:
        """Store the content of a local file; return its sha256."""
        with path.open("rb") as stream:
            return self.put_stream(stream)[0]

    def _entry(self, path: str, sha256: str, lfs: bool) -> FileEntry:
        size = self._sizes[sha256]
        git_content = lfs_pointer(sha256, size) if lfs else self.read_object(sha256)
        return FileEntry(path=path, size=size, sha256=sha256, oid=git_blob_id(git_content), lfs=lfs)

    # -- repositories --------------------------------------------------------------------

    def create_repo(self, repo_type: str, repo_id: str) -> Repo:
        """Create a repository whose `main` holds the Hub's initial `.gitattributes` commit."""
        with self.lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                raise Conflict(f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_type=repo_type, repo_id=repo_id, created_at=now_iso())
            self._repos[key] = repo
            gitattributes = self.put_bytes(self.lfs_policy.gitattributes())
            first = self._new_commit(
                repo,
                parent=None,
                files={".gitattributes": self._entry(".gitattributes", gitattributes, lfs=False)},
                title="initial commit",
                message="",
                author="system",
            )
            repo.branches["main"] = first.oid
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            if self._repos.pop((repo_type, repo_id), None) is None:
                raise RepoNotFound(f"Repository not found: {repo_type} {repo_id}")

    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        with self.lock:
            try:
                return self._repos[(repo_type, repo_id)]
            except KeyError:
                raise RepoNotFound(f"Repository not found: {repo_type} {repo_id}") from None

    def has_repo(self, repo_type: str, repo_id: str) -> bool:
        with self.lock:
            return (repo_type, repo_id) in self._repos

    # -- refs ----------------------------------------------------------------------------

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """The commit a branch, tag, full ref (`refs/heads/x`) or commit id names."""
        with self.lock:
            name = revision
            for prefix in ("refs/heads/", "refs/tags/"):
                if name.startswith(prefix):
                    name = name[len(prefix) :]
            oid = repo.branches.get(name) or repo.tags.get(name)
            if oid is None and revision in repo.commits:
                oid = revision
            if oid is None:
                raise RevisionNotFound(f"Invalid rev id: {revision}")
            return repo.commits[oid]

    def create_branch(self, repo: Repo, branch: str, starting_point: str = "main") -> Commit:
        with self.lock:
            if branch in repo.branches:
                raise Conflict(f"Reference already exists: refs/heads/{branch}")
            start = self.resolve(repo, starting_point)
            repo.branches[branch] = start.oid
            return start

    def delete_branch(self, repo: Repo, branch: str) -> None:
        with self.lock:
            if repo.branches.pop(branch, None) is None:
                raise RevisionNotFound(f"Invalid rev id: {branch}")

    def create_tag(self, repo: Repo, tag: str, revision: str) -> None:
        with self.lock:
            if tag in repo.tags:
                raise Conflict(f"Tag already exists: {tag}")
            repo.tags[tag] = self.resolve(repo, revision).oid

    def delete_tag(self, repo: Repo, tag: str) -> None:
        with self.lock:
            if repo.tags.pop(tag, None) is None:
                raise RevisionNotFound(f"Invalid rev id: {tag}")

    # -- commits -------------------------------------------------------------------------

    def _new_commit(
        self,
        repo: Repo,
        *,
        parent: str | None,
        files: Mapping[str, FileEntry],
        title: str,
        message: str,
        author: str,
    ) -> Commit:
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{next(self._commit_counter)}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid, parent, title, message, author, now_iso(), dict(files))
        repo.commits[oid] = commit
        return commit

    def commit(
        self,
        repo: Repo,
        branch: str,
        operations: Iterable[CommitOperation],
        *,
        title: str,
        message: str = "",
        parent_commit: str | None = None,
        author: str = "user",
    ) -> Commit:
        """Apply ``operations`` on top of ``branch`` as one new commit, atomically."""
        with self.lock:
            if branch not in repo.branches:
                raise RevisionNotFound(f"Invalid rev id: {branch}")
            head = repo.commits[repo.branches[branch]]
            if parent_commit is not None and parent_commit != head.oid:
                raise PreconditionFailed(
                    f"A commit has happened since {parent_commit}. Please refresh and try again."
                )
            files = dict(head.files)
            for operation in operations:
                match operation:
                    case AddFile(path=path, sha256=sha256, lfs=lfs):
                        if not self.has_object(sha256):
                            raise Unprocessable(f"Object {sha256} for {path} was never uploaded")
                        if lfs:
                            repo.lfs_objects.add(sha256)
                        files[path] = self._entry(path, sha256, lfs)
                    case DeleteFile(path=path):
                        if files.pop(path, None) is None:
                            raise EntryNotFound(f"A file with this name doesn't exist: {path}")
                    case DeleteFolder(path=path):
                        prefix = path.rstrip("/") + "/"
                        doomed = [name for name in files if name.startswith(prefix)]
                        if not doomed:
                            raise EntryNotFound(f"A folder with this name doesn't exist: {path}")
                        for name in doomed:
                            del files[name]
            commit = self._new_commit(
                repo, parent=head.oid, files=files, title=title, message=message, author=author
            )
            repo.branches[branch] = commit.oid
            return commit

    def history(self, repo: Repo, commit: Commit) -> list[Commit]:
        """``commit`` and its ancestors, newest first."""
        with self.lock:
            chain = [commit]
            while chain[-1].parent is not None:
                chain.append(repo.commits[chain[-1].parent])
            return chain

    def last_commit(self, repo: Repo, commit: Commit, path: str) -> Commit:
        """The newest commit, from ``commit`` back, that changed ``path`` (file or folder)."""
        with self.lock:
            chain = self.history(repo, commit)
            current = fingerprint(commit, path)
            for newer, older in itertools.pairwise(chain):
                if fingerprint(older, path) != current:
                    return newer
            return chain[-1]
