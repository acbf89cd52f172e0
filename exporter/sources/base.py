"""Where checkpoints come from: the interface every source implements."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SourceFile:
    """One file of a checkpoint as its source describes it.

    Attributes:
        path: path relative to the checkpoint folder.
        size: bytes.
        sha256: the hex digest, where the source knows it (Hub LFS metadata) or computed.
    """

    path: str
    size: int
    sha256: str | None = None


@dataclass
class FetchedCheckpoint:
    """A checkpoint made available on local disk for the duration of a ``fetch``.

    Attributes:
        step: the training step.
        folder: local folder holding the checkpoint's files.
        revision: the source revision (Hub commit sha), if any.
        files: the files with their sizes and hashes.
    """

    step: int
    folder: Path
    revision: str | None = None
    files: list[SourceFile] = field(default_factory=list)
    pending_files: Future[list[SourceFile]] | None = field(default=None, repr=False)

    def source_files(self) -> list[SourceFile]:
        """The files with their hashes (waiting for a background hash, if one runs)."""
        if self.pending_files is not None:
            self.files = self.pending_files.result()
            self.pending_files = None
        return self.files


class Source(abc.ABC):
    """A set of checkpoints keyed by training step."""

    #: a string naming the source in the archive (path or ``hf://org/name``)
    uri: str

    @abc.abstractmethod
    def steps(self) -> list[int]:
        """Every step the source holds, ascending."""

    @abc.abstractmethod
    def fetch(self, step: int) -> AbstractContextManager[FetchedCheckpoint]:
        """Make step ``step`` available locally; files may be removed when the context exits."""

    def step_bytes(self, step: int) -> int | None:
        """The size of a step's files, if known before fetching (used to bound disk use)."""
        return None

    def local_folder(self, step: int) -> Path | None:
        """The folder of step ``step`` when it is on this machine without fetching, else None."""
        return None

    def __iter__(self) -> Iterator[int]:
        return iter(self.steps())
