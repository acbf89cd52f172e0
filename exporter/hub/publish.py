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
:func:`exporter.hub.calls.retry` (HTTP 408, 429, 5xx and dropped connections, exponential
backoff). A commit attempt first reads the branch head and the files back and commits only
what is missing, naming the head as parent: an attempt whose response was lost is thus
recognised instead of repeated, and a concurrent writer makes the commit fail (HTTP 412)
instead of interleaving. Other errors stop with :class:`~exporter.errors.PublishError`.

Rate limit: the Hub accepts about 128 commits per hour per repository; 10 steps per commit
(the default) push the 154 steps of a Pythia run in 16 commits.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from exporter.archive.layout import MANIFEST, manifest_path
from exporter.archive.push_state import (
    PushRecord,
    deleted_after_push,
    read_push_record,
    write_push_record,
)
from exporter.errors import OptionsError, PublishError
from exporter.hub.calls import RetryPolicy, check_repo_id, hub_call
from exporter.hub.files import LocalFile, RemoteFile, step_files

log = logging.getLogger(__name__)

DEFAULT_STEPS_PER_COMMIT = 10
REPO_TYPE = "dataset"
PATHS_PER_REQUEST = 256

T = TypeVar("T")

#: plan: steps to push; skip: already on the remote; upload: a step's files uploaded ahead of
#: its commit; commit: steps committed; retry: a transient Hub error is retried; delete: local
#: files removed after a verified upload or push; card: the dataset card and manifest committed.
PushAction = Literal["plan", "skip", "upload", "commit", "retry", "delete", "card"]


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

        check_repo_id(repo_id)
        if not isinstance(steps_per_commit, int) or steps_per_commit < 1:
            raise OptionsError(f"steps_per_commit: must be at least 1, got {steps_per_commit!r}")
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
        self._uploaded: dict[str, str] = {}

    # -- Hub calls ------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn`` with transient errors retried; any failure becomes a PublishError."""
        def pause(seconds: float) -> None:
            self.progress(PushEvent("retry", detail=f"{what}: retrying in {seconds:.1f} s"))
            time.sleep(seconds)

        try:
            return hub_call(fn, what=f"{what} ({self.repo_id})", repo_id=self.repo_id,
                            policy=self.retry, error=PublishError, sleep=pause)
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
        return {item.path: RemoteFile.of_entry(item)
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
            raise PublishError(f"{self.root}: not an archive (no {MANIFEST})")
        return json.loads(path.read_text(encoding="utf-8"))

    def _manifest_for(self, steps: set[int]) -> LocalFile:
        """The manifest restricted to ``steps`` (the local file as is when it lists no more)."""
        data = self.manifest()
        keep = {str(s) for s in steps}
        if set(data["steps"]) <= keep:
            return LocalFile.of_bytes(MANIFEST, manifest_path(self.root).read_bytes())
        data["steps"] = {k: v for k, v in data["steps"].items() if k in keep}
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        return LocalFile.of_bytes(MANIFEST, text.encode("utf-8"))

    def prepare(self) -> dict[str, RemoteFile]:
        """Create the repository and branch if missing and list the remote files (once)."""
        if self._remote is None:
            self._call("create the repository", lambda: self.api.create_repo(
                self.repo_id, repo_type=REPO_TYPE, private=self.private, exist_ok=True))
            if self.revision != "main":
                self._call("create the branch", lambda: self.api.create_branch(
                    self.repo_id, repo_type=REPO_TYPE, branch=self.revision, exist_ok=True))
            self._remote = self._call("list the remote files",
                                      lambda: self._remote_files(None, self.revision))
        return self._remote

    def mark_uploaded(self, files: Iterable[LocalFile]) -> None:
        """Content uploaded ahead of its commit: commits will reference it, not read it again."""
        self._uploaded.update({f.path: f.sha256 for f in files if f.uploaded})

    def step_files(self, step: int) -> list[LocalFile]:
        """The step's files; those in this repository's storage already are marked ``uploaded``:
        uploaded ahead here (:meth:`mark_uploaded`), or missing here and recorded in
        ``.push/step{N}.json`` as uploaded to this repository (by a worker, or before a restart).
        """
        record = read_push_record(self.root, step)
        stored = record.deleted if record is not None and record.repo_id == self.repo_id else {}
        return [replace(f, uploaded=True)
                if self._uploaded.get(f.path) == f.sha256
                or (stored.get(f.path) == f.sha256 and not f.exists()) else f
                for f in step_files(self.root, step)]

    def push_steps(self, steps: Iterable[int]) -> None:
        """Push ``steps`` (skipping those already on the remote), whole steps per commit."""
        self.prepare()
        assert self._remote is not None
        pending: list[tuple[int, list[LocalFile]]] = []
        for step in sorted(set(steps) - self._on_remote):
            files = self.step_files(step)
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
            record = read_push_record(self.root, step)
            if record is not None and record.commit is None and commit is not None:
                # Uploaded ahead and removed before the commit: now it names the commit too.
                write_push_record(self.root, step, replace(record, commit=commit))
            return
        deleted = {**deleted_after_push(self.root, step), **doomed}
        # Recorded before anything is removed: a crash in between leaves files that a build
        # finds complete anyway.
        write_push_record(self.root, step, PushRecord(self.repo_id, REPO_TYPE, self.revision,
                                                      commit, deleted))
        for path in doomed:
            (self.root / path).unlink()
            self.result.deleted_files.append(path)
        self.progress(PushEvent("delete", (step,), commit, f"{len(doomed)} file(s) removed"))

    def push_card(self, written: Sequence[str] | None = None) -> None:
        """Commit the dataset card (regenerated, unless ``written`` lists its files written
        already) with the full manifest (if changed)."""
        from exporter.archive.card import write_card

        if written is None:
            written = write_card(self.root, self.repo_id, license=self.license)
        files = [LocalFile.of_bytes(path, (self.root / path).read_bytes())
                 for path in [*written, MANIFEST]]
        commit = self._commit(files, "Update dataset card and manifest")
        if commit is not None:
            self.result.commits.append(commit)
        self.progress(PushEvent("card", commit=commit,
                                detail="updated" if commit else "already up to date"))

    def push_all(self, card: Sequence[str] | None = None) -> PushResult:
        """Every completed step of the archive, then the card (``card``: see push_card)."""
        steps = sorted(int(s) for s in self.manifest()["steps"])
        if not steps:
            raise PublishError(f"{self.root}: the archive has no completed steps to push")
        self.progress(PushEvent("plan", tuple(steps), detail=f"{len(steps)} step(s) to check"))
        self.push_steps(steps)
        self.push_card(card)
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
