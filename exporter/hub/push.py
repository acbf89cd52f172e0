"""The ways in to publishing: :func:`push_archive` (a whole archive, ``neox-export push``) and
:func:`make_push_hook` (each step as a build finishes it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from exporter.hub.calls import RetryPolicy
from exporter.hub.publish import (
    DEFAULT_STEPS_PER_COMMIT,
    Publisher,
    PushEvent,
    PushResult,
)


def push_archive(root: str | Path, repo_id: str, *, private: bool = False,
                 revision: str | None = None, steps_per_commit: int = DEFAULT_STEPS_PER_COMMIT,
                 token: str | None = None, license: str | None = None, force: bool = False,
                 wait: bool | float = False, retry: RetryPolicy | None = None,
                 progress: Callable[[PushEvent], None] | None = None,
                 model_repo: str | None = None) -> PushResult:
    """Publish an archive folder as the Hub dataset ``repo_id`` (created if missing).

    Args:
        root: the archive folder (``neox-export build --out``).
        repo_id: ``ORG/NAME`` of the dataset repository.
        private: create the repository private (an existing one is left as it is).
        revision: branch to push to (created from ``main`` if missing); ``main`` when None.
        steps_per_commit: whole steps per commit; keep ``ceil(steps / K)`` under the Hub's
            ~128 commits per hour.
        token: Hub token (``HF_TOKEN`` or the saved login when None).
        license: the card's license, one of the Hub's identifiers; None takes the source
            model's (``exporter.hub.licenses``), else ``unknown``.
        force: push even into a dataset built from another source or with other options
            (its manifest is replaced).
        wait: another process writing the archive makes the push wait for it (True, or at
            most that many seconds) instead of failing at once.
        retry: backoff for transient errors.
        progress: called with each :class:`PushEvent`.
        model_repo: the run's model repository (:mod:`exporter.hub.modelrepo`), linked from the card.

    Returns:
        The commits made, and the steps pushed or found on the remote already.

    Raises:
        PublishError: a non-transient Hub error, transient ones past the retry budget, a
            local file that differs from its recorded sha256, or (without ``force``) a
            dataset built from another source or with other options.
        ArchiveLockedError: another process is writing the archive (see ``wait``).

    Example:
        >>> result = push_archive("archive", "me/pythia-tiny-checkpoints")   # doctest: +SKIP
        >>> len(result.commits), result.pushed_steps                          # doctest: +SKIP
        (2, [0, 1, 2, 4, 8])
    """
    return Publisher(root, repo_id, private=private, revision=revision, token=token,
                     steps_per_commit=steps_per_commit, license=license, force=force,
                     wait=wait, retry=retry, progress=progress,
                     model_repo=model_repo).push_all()


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
                   license: str | None = None, delete_after_push: bool = False,
                   force: bool = False, wait: bool | float = False,
                   retry: RetryPolicy | None = None,
                   progress: Callable[[PushEvent], None] | None = None,
                   model_repo: str | None = None) -> PushHook:
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
                              delete_after_push=delete_after_push, force=force, wait=wait, retry=retry,
                              progress=progress, model_repo=model_repo))
