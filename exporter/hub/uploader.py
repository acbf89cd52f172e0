"""The upload stage of a build: upload each converted step now, commit whole steps later.

A build hands every converted step to :class:`StepUploader`, which runs in a thread of its
own, so uploading step N overlaps the conversion of step N+1 and the download of step N+2.
It uploads the step's tensor files to the dataset's storage without a commit
(:func:`exporter.hub.upload.upload_step_files`); with ``delete_after_push`` it records them in
``.push/step{N}.json`` and removes them at once, before their commit batch closes, so converted
steps never pile up on disk waiting for a commit. Every ``steps_per_commit`` uploaded steps it
commits them in one commit through :meth:`Publisher.push_steps`, which references the uploaded
content, reads the files back and skips whatever the remote already holds (the verified,
retried, duplicate-free commit of :mod:`exporter.hub.publish`). :meth:`StepUploader.finish`
commits the rest and the dataset card.

Steps converted elsewhere (Ray workers, which upload their own files) arrive with their tensor
files already in the dataset's storage: only their small files and index shards remain.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from exporter.archive.layout import checkpoint_index_path, tensor_index_path
from exporter.archive.push_state import PushRecord, deleted_after_push, write_push_record
from exporter.errors import PublishError
from exporter.hub.publish import REPO_TYPE, Publisher, PushEvent, PushResult
from exporter.hub.upload import upload_step_files

Release = Callable[[], None]


class StepUploader:
    """Uploads steps in a background thread and commits them ``steps_per_commit`` at a time.

    Args:
        publisher: the repository, branch, batch size and deletion policy.

    Example:
        >>> uploader = StepUploader(Publisher("archive", "me/run"))   # doctest: +SKIP
        >>> uploader.submit(1000)                                       # doctest: +SKIP
        >>> uploader.finish().commits                                   # doctest: +SKIP
    """

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._queue: queue.Queue[tuple[int, Release | None] | None] = queue.Queue()
        self._ready: list[int] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="step-uploader", daemon=True)
        self._started = False

    def start(self) -> StepUploader:
        """Create the repository (workers upload into it) and start the upload thread."""
        self.publisher.prepare()
        self._thread.start()
        self._started = True
        return self

    def submit(self, step: int, release: Release | None = None) -> None:
        """Queue a converted step; ``release`` is called once its files are off the disk.

        Raises:
            PublishError: an earlier upload or commit failed (the build stops).
        """
        self._check()
        self._queue.put((step, release))

    def finish(self) -> PushResult:
        """Wait for queued uploads, commit what is left (and any completed step the remote
        lacks), then the card; returns everything this push did."""
        from exporter.archive.card import write_card

        publisher = self.publisher
        if not publisher.manifest()["steps"]:
            self.abort()
            self._check()
            return publisher.result  # every step failed: nothing to publish
        # The card (plots included) is drawn while the last uploads run.
        card = write_card(publisher.root, publisher.repo_id, license=publisher.card_license(),
                          model_repo=publisher.model_repo)
        if self._started:
            self._queue.put(None)
            self._thread.join()
        self._check()
        return publisher.push_all(card)

    def abort(self) -> None:
        """Stop after the current upload, leaving queued steps for a later run."""
        if self._started:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item[1] is not None:
                    item[1]()
            self._queue.put(None)
            self._thread.join()

    def _check(self) -> None:
        if self._error is not None:
            if isinstance(self._error, PublishError):
                raise self._error
            raise PublishError(f"upload failed: {type(self._error).__name__}: {self._error}")

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            step, release = item
            try:
                if self._error is None:
                    self._upload(step)
                    self._ready.append(step)
                    if len(self._ready) >= self.publisher.steps_per_commit:
                        batch, self._ready = self._ready, []
                        self.publisher.push_steps(batch)
            except BaseException as exc:  # noqa: BLE001 - reported to the build by submit/finish
                self._error = exc
            finally:
                if release is not None:
                    release()

    def _upload(self, step: int) -> None:
        publisher = self.publisher
        root = publisher.root
        files = publisher.step_files(step)
        remote = publisher.prepare()
        if all(f.matches(remote.get(f.path)) for f in files):
            return  # committed by an earlier run: push_steps skips it
        todo = [f for f in files if not f.uploaded and f.exists()]
        uploaded, _ = upload_step_files(publisher.api, publisher.repo_id, publisher.revision,
                                        todo, publisher.retry)
        publisher.mark_uploaded(uploaded)
        publisher.progress(PushEvent("upload", (step,), detail=f"{len(uploaded)} file(s) uploaded"))
        shards = {p.relative_to(root).as_posix()
                  for p in (tensor_index_path(root, step), checkpoint_index_path(root, step))}
        doomed = {f.path: f.sha256 for f in uploaded
                  if f.path not in shards and f.local is not None and f.local.is_file()}
        if not publisher.delete_after_push or not doomed:
            return
        # Recorded before anything is removed, as Publisher does after a commit: a crash in
        # between leaves files a build finds complete anyway, and the commit references them.
        write_push_record(root, step, PushRecord(publisher.repo_id, REPO_TYPE, publisher.revision,
                                                 None, {**deleted_after_push(root, step), **doomed}))
        for path in doomed:
            (root / path).unlink()
            publisher.result.deleted_files.append(path)
        publisher.progress(PushEvent("delete", (step,), None,
                                     f"{len(doomed)} file(s) removed after upload"))
