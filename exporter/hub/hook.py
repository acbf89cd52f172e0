"""Publishing as a build goes: a hook that pushes each finished step (``build --push-to``)."""

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
