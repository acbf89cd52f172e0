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

Mixing runs: a dataset whose ``manifest.json`` names another source (or other export options)
is refused before anything is committed, as ``build`` refuses to mix them in one folder;
``force=True`` (``push --force``) replaces it.

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
from exporter.archive.lock import archive_lock
from exporter.archive.push_state import (
    PushRecord,
    deleted_after_push,
    read_push_record,
    write_push_record,
)
from exporter.archive.trust import read_json, resolve_inside
from exporter.archive.validate import validate_manifest
from exporter.errors import OptionsError, PublishError
from exporter.hub.calls import RetryPolicy, check_repo_id, hub_call
from exporter.hub.files import LocalFile, RemoteFile, step_files
from exporter.hub.licenses import UNKNOWN, check_license, default_license

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

    :func:`push_archive` and :func:`make_push_hook` are the ways in. With ``repo_type="model"``
    :mod:`exporter.hub.modelrepo` uses :meth:`commit_files` to fill one branch of a model repository
    per step; ``model_repo`` is the run's model repository, linked from the dataset card.
    """

    def __init__(self, root: str | Path, repo_id: str, *, private: bool = False,
                 revision: str | None = None, token: str | None = None,
                 steps_per_commit: int = DEFAULT_STEPS_PER_COMMIT, license: str | None = None,
                 delete_after_push: bool = False, force: bool = False,
                 wait: bool | float = False, retry: RetryPolicy | None = None,
                 progress: Callable[[PushEvent], None] | None = None,
                 repo_type: str = REPO_TYPE, model_repo: str | None = None) -> None:
        from huggingface_hub import HfApi

        check_repo_id(repo_id)
        if not isinstance(steps_per_commit, int) or steps_per_commit < 1:
            raise OptionsError(f"steps_per_commit: must be at least 1, got {steps_per_commit!r}")
        self.root = Path(root)
        self.repo_id = repo_id
        self.revision = revision or "main"
        self.private = private
        self.steps_per_commit = steps_per_commit
        # None: the source model's license, else "unknown" (exporter.hub.licenses), resolved
        # when the card is written.
        self.license = check_license(license) if license is not None else None
        self.delete_after_push = delete_after_push
        self.repo_type = repo_type
        self.model_repo = model_repo  # linked from the dataset card
        self.force = force
        #: the manifest of the run being pushed, when a build pushes before writing its own
        self.run: dict[str, Any] | None = None
        self.wait = wait
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
        return str(self.api.repo_info(self.repo_id, repo_type=self.repo_type, revision=self.revision).sha)

    def _remote_files(self, paths: Sequence[str] | None, revision: str) -> dict[str, RemoteFile]:
        """Files at ``revision``: the given paths, or the whole tree."""
        if paths is None:
            items: list[Any] = list(self.api.list_repo_tree(
                self.repo_id, repo_type=self.repo_type, revision=revision, recursive=True))
        else:
            # In chunks, as huggingface_hub's own preupload calls go (_commit_api.py,
            # `_fetch_upload_modes`: 256 paths per request).
            items = [item for start in range(0, len(paths), PATHS_PER_REQUEST)
                     for item in self.api.get_paths_info(
                         self.repo_id, list(paths[start:start + PATHS_PER_REQUEST]),
                         repo_type=self.repo_type, revision=revision)]
        return {item.path: RemoteFile.of_entry(item)
                for item in items if hasattr(item, "lfs")}  # RepoFile, not RepoFolder

    def _ensure_repo(self) -> None:
        """Create the repository and the branch if they are missing."""
        self._call("create the repository", lambda: self.api.create_repo(
            self.repo_id, repo_type=self.repo_type, private=self.private, exist_ok=True))
        if self.revision != "main":
            self._call("create the branch", lambda: self.api.create_branch(
                self.repo_id, repo_type=self.repo_type, branch=self.revision, exist_ok=True))

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
                self.repo_id, [operations[f.path] for f in missing], repo_type=self.repo_type,
                revision=self.revision, commit_message=message, parent_commit=head)
            return str(info.oid)

        return self._call(f"commit {message!r}", attempt)

    # -- steps and card -------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        path = manifest_path(self.root)
        if not path.is_file():
            raise PublishError(f"{self.root}: not an archive (no {MANIFEST})")
        label = f"{path}"
        return validate_manifest(read_json(self._manifest_file(), label), label, only=("steps",))

    def _manifest_file(self) -> Path:
        return resolve_inside(self.root, MANIFEST, str(self.root))

    def _manifest_for(self, steps: set[int]) -> LocalFile:
        """The manifest restricted to ``steps`` (the local file as is when it lists no more)."""
        data = self.manifest()
        keep = {str(s) for s in steps}
        if set(data["steps"]) <= keep:
            return LocalFile.of_bytes(MANIFEST, self._manifest_file().read_bytes())
        data["steps"] = {k: v for k, v in data["steps"].items() if k in keep}
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        return LocalFile.of_bytes(MANIFEST, text.encode("utf-8"))

    def _check_same_run(self) -> None:
        """Refuse (unless ``force``) a remote whose manifest names another source or other
        export options: its steps and this archive's would be mixed under one manifest."""
        assert self._remote is not None
        if self.force or MANIFEST not in self._remote:
            return
        path = self._call("read the remote manifest", lambda: self.api.hf_hub_download(
            self.repo_id, MANIFEST, repo_type=REPO_TYPE, revision=self.revision))
        try:
            remote = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise PublishError(f"{self.repo_id}: unreadable remote {MANIFEST}: {exc}; "
                               f"use --force to replace it") from exc
        local = self.run if self.run is not None else self.manifest()
        for key, what in (("source", "built from"), ("options", "built with options")):
            if remote.get(key) is not None and remote.get(key) != local.get(key):
                raise PublishError(
                    f"{self.repo_id} (revision {self.revision}) was {what} {remote[key]!r}, "
                    f"but {self.root} was {what} {local.get(key)!r}; push to another dataset "
                    f"or branch, or use --force to replace its manifest")

    def prepare(self) -> dict[str, RemoteFile]:
        """Create the repository and branch if missing and list the remote files (once);
        a remote archive of another run is refused (:meth:`_check_same_run`)."""
        if self._remote is None:
            self._ensure_repo()
            self._remote = self._call("list the remote files",
                                      lambda: self._remote_files(None, self.revision))
            self._check_same_run()
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
        """Read the files back from the remote (:meth:`_read_back`) and remember them."""
        remote = self._read_back(files, commit)
        assert self._remote is not None
        self._remote.update(remote)

    def _read_back(self, files: Sequence[LocalFile], commit: str | None) -> dict[str, RemoteFile]:
        """The files as the remote lists them after ``commit`` (the head when None); raise
        unless each has its recorded sha256."""
        remote = self._call("read back the commit", lambda: self._remote_files(
            [f.path for f in files], commit or self._head()))
        bad = [f.path for f in files if not f.matches(remote.get(f.path))]
        if bad:
            raise PublishError(f"{self.repo_id}: after the commit, {len(bad)} file(s) differ "
                               f"from the local ones, e.g. {bad[0]}")
        return remote

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
        write_push_record(self.root, step, PushRecord(self.repo_id, self.repo_type, self.revision,
                                                      commit, deleted))
        for path in doomed:
            resolve_inside(self.root, path, str(self.root))  # never unlink through a link out
            (self.root / path).unlink()
            self.result.deleted_files.append(path)
        self.progress(PushEvent("delete", (step,), commit, f"{len(doomed)} file(s) removed"))

    def card_license(self) -> str:
        """The card's license: the one given, else the source model's, else ``unknown``
        (:mod:`exporter.hub.licenses`), resolved once."""
        if self.license is None:
            chosen, origin = default_license(str(self.manifest().get("source", "")),
                                             self.api.token)
            if chosen == UNKNOWN:
                log.warning("dataset card license: %s (%s)", chosen, origin)
            else:
                log.info("dataset card license: %s (from %s)", chosen, origin)
            self.license = chosen
        return self.license

    def push_card(self, written: Sequence[str] | None = None) -> None:
        """Commit the dataset card (regenerated, unless ``written`` lists its files written
        already) with the full manifest (if changed)."""
        from exporter.archive.card import write_card

        if written is None:
            written = write_card(self.root, self.repo_id, license=self.card_license(),
                                 model_repo=self.model_repo)
        files = [LocalFile.of_bytes(path, resolve_inside(self.root, path, str(self.root)).read_bytes())
                 for path in [*written, MANIFEST]]
        commit = self._commit(files, "Update dataset card and manifest")
        if commit is not None:
            self.result.commits.append(commit)
        self.progress(PushEvent("card", commit=commit,
                                detail="updated" if commit else "already up to date"))

    def commit_files(self, files: Sequence[LocalFile], message: str) -> str | None:
        """Commit files that belong to no step (a catalog's tables and card) the way steps
        are committed: repository and branch created if missing, only what the remote lacks
        sent, each file read back and checked. The commit id, None if already up to date."""
        self._ensure_repo()
        commit = self._commit(files, message)
        self._read_back(files, commit)
        if commit is not None:
            self.result.commits.append(commit)
        return commit

    def push_all(self, card: Sequence[str] | None = None) -> PushResult:
        """Every completed step of the archive, then the card (``card``: see push_card),
        under the archive's lock (pushing writes the card and may delete files:
        :mod:`exporter.archive.lock`; re-entrant for a build that holds it)."""
        with archive_lock(self.root, wait=self.wait, command=f"push to {self.repo_id}"):
            steps = sorted(int(s) for s in self.manifest()["steps"])
            if not steps:
                raise PublishError(f"{self.root}: the archive has no completed steps to push")
            self.progress(PushEvent("plan", tuple(steps), detail=f"{len(steps)} step(s) to check"))
            self.push_steps(steps)
            self.push_card(card)
        return self.result
