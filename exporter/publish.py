"""Publish an archive to the Hugging Face Hub as a dataset, step by step, resumably.

Each commit adds whole steps: every file of ``steps/step{N}/`` and both index shards of each
step, ``steps_per_commit`` steps at a time, with a ``manifest.json`` that lists exactly the
steps on the remote after that commit, so the remote is a consistent archive at every commit.
A last commit adds the dataset card (``README.md`` and its plot) and the full manifest.

Resume: the remote tree is listed first, with its LFS sha256 metadata, and a step whose files
are all there with the sha256s the archive records (the checkpoint index's ``output_files``;
the index shards are hashed) is skipped. Re-running an interrupted push completes it without
duplicating or losing anything, and pushing an unchanged archive again makes no commit.

Retries: huggingface_hub 2.4 retries LFS transfers itself, but fails at once on any error of
the commit POST and raises when a commit's response is lost although the commit landed
(DESIGN.md "Facts about huggingface_hub 2.4 offline"). Every Hub call here goes through
:func:`exporter.hubio.retry` (HTTP 408, 429, 5xx and dropped connections, exponential
backoff). A commit attempt first reads the branch head and the files back and commits only
what is missing, naming the head as parent: an attempt whose response was lost is thus
recognised instead of repeated, and a concurrent writer makes the commit fail (HTTP 412)
instead of interleaving. Other errors stop with :class:`~exporter.errors.PublishError`.

Rate limit: the Hub accepts about 128 commits per hour per repository; 10 steps per commit
(the default) push the 154 steps of a Pythia run in 16 commits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from exporter.archive.layout import (
    checkpoint_index_path,
    manifest_path,
    tensor_index_path,
    write_json_atomic,
)
from exporter.archive.trust import check_relative, read_json, resolve_inside
from exporter.archive.validate import read_shard, validate_manifest
from exporter.errors import PublishError
from exporter.hubio import retry
from exporter.sources.local import file_sha256

log = logging.getLogger(__name__)

DEFAULT_STEPS_PER_COMMIT = 10
REPO_TYPE = "dataset"
#: local-only record of the files removed after a verified push (``--delete-after-push``)
PUSH_STATE_DIR = ".push"
PATHS_PER_REQUEST = 256

T = TypeVar("T")

#: plan: steps to push; skip: already on the remote; commit: steps committed; retry: a
#: transient Hub error is retried; delete: local files removed after a verified push; card:
#: the dataset card and manifest committed.
PushAction = Literal["plan", "skip", "commit", "retry", "delete", "card"]


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient Hub errors (see :func:`exporter.hubio.retry`).

    Attributes:
        attempts: tries per operation, the first included.
        base_delay: seconds before the first retry, doubled for each further one.
        max_delay: the longest wait, a server's ``Retry-After`` included.
    """

    attempts: int = 6
    base_delay: float = 2.0
    max_delay: float = 120.0


@dataclass(frozen=True)
class PushEvent:
    """Progress of a push: one :data:`PushAction` on some steps."""

    action: PushAction
    steps: tuple[int, ...] = ()
    commit: str | None = None
    detail: str = ""


@dataclass
class PushResult:
    """What a push did. ``commits`` are the ids of the commits it made (none if up to date)."""

    repo_id: str
    revision: str
    url: str
    commits: list[str] = field(default_factory=list)
    pushed_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    deleted_files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RemoteFile:
    """A file on the remote: size, LFS sha256 (None for regular files) and git blob id."""

    size: int
    sha256: str | None
    blob_id: str


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class LocalFile:
    """A file to publish: a file of the archive, or ``data`` held in memory.

    ``sha256`` is the digest the archive records (checkpoint index ``output_files``).
    """

    path: str
    local: Path | None
    sha256: str
    size: int
    data: bytes | None = None

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


def step_files(root: Path, step: int) -> list[LocalFile]:
    """Every file of one step: its output files (sha256 from the checkpoint index) and shards.

    Every path is archive content: validated, and resolved inside the root
    (exporter/archive/trust.py), so a push never uploads, and ``--delete-after-push`` never
    removes, a file outside the archive.
    """
    shards = {p.relative_to(root).as_posix(): p
              for p in (tensor_index_path(root, step), checkpoint_index_path(root, step))}
    if not all(p.is_file() for p in shards.values()):
        raise PublishError(f"{root}: step {step} has no index shards; build it first")
    real = {relative: resolve_inside(root, relative, str(root)) for relative in shards}
    tables = {relative: read_shard(path, f"{root}/{relative}") for relative, path in real.items()}
    checkpoints = checkpoint_index_path(root, step).relative_to(root).as_posix()
    label = f"{root}/{checkpoints}"
    files = [LocalFile(e["path"], resolve_inside(root, e["path"], f"{label} output_files"),
                       e["sha256"], e["bytes"])
             for e in tables[checkpoints].to_pylist()[0]["output_files"]]
    files += [LocalFile(relative, path, file_sha256(path), path.stat().st_size)
              for relative, path in real.items()]
    return files


def push_state_path(root: Path, step: int) -> Path:
    return root / PUSH_STATE_DIR / f"step{step}.json"


def deleted_after_push(root: str | Path, step: int) -> dict[str, str]:
    """Files of ``step`` removed after a verified push: relative path -> sha256 (may be empty).

    A build may count such a file as present when its checkpoint-index sha256 is the one
    recorded here, so a step pushed with ``--delete-after-push`` stays complete.
    """
    path = push_state_path(Path(root), step)
    if not path.is_file():
        return {}
    record = read_json(path, str(path))
    deleted = record.get("deleted", {}) if isinstance(record, dict) else None
    if not isinstance(deleted, dict):
        raise PublishError(f"{path}: 'deleted' is not an object")
    for relative, sha256 in deleted.items():
        check_relative(relative, f"{path}: deleted")
        if not isinstance(sha256, str):
            raise PublishError(f"{path}: sha256 of {relative!r} is not text")
    return dict(deleted)


def _commit_message(steps: Sequence[int]) -> str:
    if len(steps) == 1:
        return f"Add step {steps[0]}"
    return f"Add steps {steps[0]}-{steps[-1]} ({len(steps)} steps)"


class Publisher:
    """Pushes one archive folder to one dataset repository and branch.

    :func:`push_archive` and :func:`make_push_hook` are the ways in.
    """

    def __init__(self, root: str | Path, repo_id: str, *, private: bool = False,
                 revision: str | None = None, token: str | None = None,
                 steps_per_commit: int = DEFAULT_STEPS_PER_COMMIT, license: str = "apache-2.0",
                 delete_after_push: bool = False, retry: RetryPolicy | None = None,
                 progress: Callable[[PushEvent], None] | None = None) -> None:
        from huggingface_hub import HfApi

        if steps_per_commit < 1:
            raise PublishError(f"steps_per_commit must be at least 1, got {steps_per_commit}")
        self.root = Path(root)
        self.repo_id = repo_id
        self.revision = revision or "main"
        self.private = private
        self.steps_per_commit = steps_per_commit
        self.license = license
        self.delete_after_push = delete_after_push
        self.retry = retry or RetryPolicy()
        self.progress = progress or (lambda event: None)
        self.api = HfApi(token=token)
        self.result = PushResult(repo_id, self.revision,
                                 f"{self.api.endpoint}/datasets/{repo_id}/tree/{self.revision}")
        self._remote: dict[str, RemoteFile] | None = None
        self._on_remote: set[int] = set()

    # -- Hub calls ------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn`` with transient errors retried; any failure becomes a PublishError."""
        def pause(seconds: float) -> None:
            self.progress(PushEvent("retry", detail=f"{what}: retrying in {seconds:.1f} s"))
            time.sleep(seconds)

        try:
            return retry(fn, what=f"{what} ({self.repo_id})", attempts=self.retry.attempts,
                         base_delay=self.retry.base_delay, max_delay=self.retry.max_delay,
                         error=PublishError, sleep=pause)
        except PublishError:
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure stops the push, named
            raise PublishError(f"could not {what} ({self.repo_id}): {exc}") from exc

    def _head(self) -> str:
        return str(self.api.repo_info(self.repo_id, repo_type=REPO_TYPE, revision=self.revision).sha)

    def _remote_files(self, paths: Sequence[str] | None, revision: str) -> dict[str, RemoteFile]:
        """Files at ``revision``: the given paths, or the whole tree."""
        if paths is None:
            items: list[Any] = list(self.api.list_repo_tree(
                self.repo_id, repo_type=REPO_TYPE, revision=revision, recursive=True))
        else:
            # In chunks, as huggingface_hub's own preupload calls go (_commit_api.py,
            # `_fetch_upload_modes`: 256 paths per request).
            items = [item for start in range(0, len(paths), PATHS_PER_REQUEST)
                     for item in self.api.get_paths_info(
                         self.repo_id, list(paths[start:start + PATHS_PER_REQUEST]),
                         repo_type=REPO_TYPE, revision=revision)]
        return {item.path: RemoteFile(item.size, item.lfs.sha256 if item.lfs else None,
                                      item.blob_id)
                for item in items if hasattr(item, "lfs")}  # RepoFile, not RepoFolder

    def _commit(self, files: Sequence[LocalFile], message: str) -> str | None:
        """Commit whichever of ``files`` the remote lacks; the commit id, or None if none.

        Each attempt reads the head and the files back first, so it can be retried blindly:
        a previous attempt whose response was lost but which landed leaves nothing missing.
        """
        operations: dict[str, Any] = {}  # kept across attempts: LFS objects upload once
        posted = False

        def attempt() -> str | None:
            nonlocal posted
            head = self._head()
            remote = self._remote_files([f.path for f in files], head)
            missing = [f for f in files if not f.matches(remote.get(f.path))]
            if not missing:
                return head if posted else None
            for f in missing:
                if f.path not in operations:
                    operations[f.path] = f.operation()
            posted = True
            info = self.api.create_commit(
                self.repo_id, [operations[f.path] for f in missing], repo_type=REPO_TYPE,
                revision=self.revision, commit_message=message, parent_commit=head)
            return str(info.oid)

        return self._call(f"commit {message!r}", attempt)

    # -- steps and card -------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        path = manifest_path(self.root)
        if not path.is_file():
            raise PublishError(f"{self.root}: not an archive (no manifest.json)")
        label = f"{path}"
        return validate_manifest(read_json(self._manifest_file(), label), label, only=("steps",))

    def _manifest_file(self) -> Path:
        return resolve_inside(self.root, "manifest.json", str(self.root))

    def _manifest_for(self, steps: set[int]) -> LocalFile:
        """The manifest restricted to ``steps`` (the local file as is when it lists no more)."""
        data = self.manifest()
        keep = {str(s) for s in steps}
        if set(data["steps"]) <= keep:
            return LocalFile.of_bytes("manifest.json", self._manifest_file().read_bytes())
        data["steps"] = {k: v for k, v in data["steps"].items() if k in keep}
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        return LocalFile.of_bytes("manifest.json", text.encode("utf-8"))

    def push_steps(self, steps: Iterable[int]) -> None:
        """Push ``steps`` (skipping those already on the remote), whole steps per commit."""
        if self._remote is None:
            self._call("create the repository", lambda: self.api.create_repo(
                self.repo_id, repo_type=REPO_TYPE, private=self.private, exist_ok=True))
            if self.revision != "main":
                self._call("create the branch", lambda: self.api.create_branch(
                    self.repo_id, repo_type=REPO_TYPE, branch=self.revision, exist_ok=True))
            self._remote = self._call("list the remote files",
                                      lambda: self._remote_files(None, self.revision))
        pending: list[tuple[int, list[LocalFile]]] = []
        for step in sorted(set(steps) - self._on_remote):
            files = step_files(self.root, step)
            if all(f.matches(self._remote.get(f.path)) for f in files):
                self._on_remote.add(step)
                self.result.skipped_steps.append(step)
                self.progress(PushEvent("skip", (step,), detail="already on the remote"))
                self._after_verified(step, files, None)
            else:
                pending.append((step, files))
        for start in range(0, len(pending), self.steps_per_commit):
            batch = pending[start:start + self.steps_per_commit]
            numbers = [step for step, _ in batch]
            files = [f for _, step_list in batch for f in step_list]
            manifest = self._manifest_for(self._on_remote | set(numbers))
            commit = self._commit([*files, manifest], _commit_message(numbers))
            self._verify(files, commit)
            if commit is not None:
                self.result.commits.append(commit)
            self.result.pushed_steps.extend(numbers)
            self._on_remote.update(numbers)
            self.progress(PushEvent("commit", tuple(numbers), commit, _commit_message(numbers)))
            for step, step_list in batch:
                self._after_verified(step, step_list, commit)

    def _verify(self, files: Sequence[LocalFile], commit: str | None) -> None:
        """Read the files back from the remote; raise unless each has its recorded sha256."""
        remote = self._call("read back the commit", lambda: self._remote_files(
            [f.path for f in files], commit or self._head()))
        bad = [f.path for f in files if not f.matches(remote.get(f.path))]
        if bad:
            raise PublishError(f"{self.repo_id}: after the commit, {len(bad)} file(s) differ "
                               f"from the archive, e.g. {bad[0]}")
        assert self._remote is not None
        self._remote.update(remote)

    def _after_verified(self, step: int, files: Sequence[LocalFile], commit: str | None) -> None:
        """With ``delete_after_push``: record, then remove, the step's safetensors files."""
        doomed = {f.path: f.sha256 for f in files if f.path.endswith(".safetensors") and f.exists()}
        if not self.delete_after_push or not doomed:
            return
        deleted = {**deleted_after_push(self.root, step), **doomed}
        # Recorded before anything is removed: a crash in between leaves files that a build
        # finds complete anyway.
        write_json_atomic(push_state_path(self.root, step), {
            "repo_id": self.repo_id, "repo_type": REPO_TYPE, "revision": self.revision,
            "commit": commit, "deleted": dict(sorted(deleted.items()))})
        for path in doomed:
            resolve_inside(self.root, path, str(self.root))  # never unlink through a link out
            (self.root / path).unlink()
            self.result.deleted_files.append(path)
        self.progress(PushEvent("delete", (step,), commit, f"{len(doomed)} file(s) removed"))

    def push_card(self) -> None:
        """Regenerate the dataset card and commit it with the full manifest (if changed)."""
        from exporter.archive.card import write_card

        written = write_card(self.root, self.repo_id, license=self.license)
        files = [LocalFile.of_bytes(path, resolve_inside(self.root, path, str(self.root)).read_bytes())
                 for path in [*written, "manifest.json"]]
        commit = self._commit(files, "Update dataset card and manifest")
        if commit is not None:
            self.result.commits.append(commit)
        self.progress(PushEvent("card", commit=commit,
                                detail="updated" if commit else "already up to date"))

    def push_all(self) -> PushResult:
        """Every completed step of the archive, then the card."""
        steps = sorted(int(s) for s in self.manifest()["steps"])
        if not steps:
            raise PublishError(f"{self.root}: the archive has no completed steps to push")
        self.progress(PushEvent("plan", tuple(steps), detail=f"{len(steps)} step(s) to check"))
        self.push_steps(steps)
        self.push_card()
        return self.result


def push_archive(root: str | Path, repo_id: str, *, private: bool = False,
                 revision: str | None = None, steps_per_commit: int = DEFAULT_STEPS_PER_COMMIT,
                 token: str | None = None, license: str = "apache-2.0",
                 retry: RetryPolicy | None = None,
                 progress: Callable[[PushEvent], None] | None = None) -> PushResult:
    """Publish an archive folder as the Hub dataset ``repo_id`` (created if missing).

    Args:
        root: the archive folder (``neox-export build --out``).
        repo_id: ``ORG/NAME`` of the dataset repository.
        private: create the repository private (an existing one is left as it is).
        revision: branch to push to (created from ``main`` if missing); ``main`` when None.
        steps_per_commit: whole steps per commit; keep ``ceil(steps / K)`` under the Hub's
            ~128 commits per hour.
        token: Hub token (``HF_TOKEN`` or the saved login when None).
        license: the card's license identifier.
        retry: backoff for transient errors.
        progress: called with each :class:`PushEvent`.

    Returns:
        The commits made, and the steps pushed or found on the remote already.

    Raises:
        PublishError: a non-transient Hub error, transient ones past the retry budget, or a
            local file that differs from its recorded sha256.

    Example:
        >>> result = push_archive("archive", "me/pythia-tiny-checkpoints")   # doctest: +SKIP
        >>> len(result.commits), result.pushed_steps                          # doctest: +SKIP
        (2, [0, 1, 2, 4, 8])
    """
    return Publisher(root, repo_id, private=private, revision=revision, token=token,
                     steps_per_commit=steps_per_commit, license=license, retry=retry,
                     progress=progress).push_all()


class PushHook:
    """Publishes steps as a build finishes them: ``BuildOptions(on_step_done=hook)``.

    Steps are committed ``steps_per_commit`` at a time; :meth:`flush` commits the rest (and
    any completed step the remote lacks, such as steps a resumed build skipped), then the card.
    """

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._pending: list[int] = []

    def __call__(self, step: int) -> None:
        self._pending.append(step)
        if len(self._pending) >= self.publisher.steps_per_commit:
            self.publisher.push_steps(self._pending)
            self._pending = []

    def flush(self) -> PushResult:
        """Push what is left and the card; returns everything this hook did."""
        self._pending = []
        return self.publisher.push_all()


def make_push_hook(root: str | Path, repo_id: str, *, private: bool = False,
                   revision: str | None = None,
                   steps_per_commit: int = DEFAULT_STEPS_PER_COMMIT, token: str | None = None,
                   license: str = "apache-2.0", delete_after_push: bool = False,
                   retry: RetryPolicy | None = None,
                   progress: Callable[[PushEvent], None] | None = None) -> PushHook:
    """A build hook that publishes each finished step (``build --push-to``).

    With ``delete_after_push`` the safetensors files of a step are removed once the remote
    holds them with their sha256s; index shards, small files and manifest stay, and
    ``ARCHIVE/.push/step{N}.json`` records what was removed (:func:`deleted_after_push`).
    Call ``hook.flush()`` after the build.

    Example:
        >>> hook = make_push_hook("archive", "me/pythia-tiny-checkpoints")     # doctest: +SKIP
        >>> build(source, "archive", BuildOptions(on_step_done=hook))          # doctest: +SKIP
        >>> hook.flush()                                                       # doctest: +SKIP
    """
    return PushHook(Publisher(root, repo_id, private=private, revision=revision, token=token,
                              steps_per_commit=steps_per_commit, license=license,
                              delete_after_push=delete_after_push, retry=retry,
                              progress=progress))
