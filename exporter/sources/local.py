"""Checkpoints in a local folder.

Three shapes are recognised:
- a GPT-NeoX save folder: ``global_step{N}/`` folders, usually with a ``latest`` file
  (DeepSpeed ``engine.save_checkpoint`` writes the tag folder and ``latest``);
- a folder of ``step{N}/`` folders (a local copy of a Hub repository's branches);
- a single checkpoint folder (its step read from ``latest``-style names or the engine state).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from exporter.errors import SourceError
from exporter.files import file_sha256
from exporter.neox.checkpoint import holds_checkpoint
from exporter.sources.base import FetchedCheckpoint, Source, SourceFile

STEP_FOLDER = re.compile(r"^(?:global_)?step(\d+)$")


def _is_checkpoint(folder: Path) -> bool:
    return holds_checkpoint(folder)


class LocalSource(Source):
    """Checkpoints under a local folder."""

    def __init__(self, root: str | Path, single_step: int | None = None) -> None:
        self.root = Path(root)
        self.uri = str(self.root)
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: no such folder")
        self._folders: dict[int, Path] = {}
        for child in sorted(self.root.iterdir()):
            m = STEP_FOLDER.match(child.name)
            if m and child.is_dir() and _is_checkpoint(child):
                step = int(m[1])
                if step in self._folders:
                    raise SourceError(
                        f"{self.root}: step {step} appears twice ({self._folders[step].name}, {child.name})"
                    )
                self._folders[step] = child
        if not self._folders and _is_checkpoint(self.root):
            m = STEP_FOLDER.match(self.root.name)
            step = single_step if single_step is not None else (int(m[1]) if m else 0)
            self._folders[step] = self.root
        if not self._folders:
            raise SourceError(
                f"{self.root}: no checkpoints (expected global_stepN/ or stepN/ folders, or "
                f"layer_*/mp_rank_* files)"
            )

    def steps(self) -> list[int]:
        return sorted(self._folders)

    def local_folder(self, step: int) -> Path | None:
        return self._folders.get(step)

    def step_bytes(self, step: int) -> int | None:
        return sum(p.stat().st_size for p in self._folders[step].rglob("*") if p.is_file())

    @contextmanager
    def fetch(self, step: int) -> Iterator[FetchedCheckpoint]:
        if step not in self._folders:
            raise SourceError(f"{self.root}: no step {step}")
        folder = self._folders[step]

        stop = threading.Event()

        def hash_all() -> list[SourceFile]:
            return [
                SourceFile(str(p.relative_to(folder)), p.stat().st_size, file_sha256(p, stop))
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            ]

        # Hash the source in a thread while the step converts: hashlib releases the GIL, and
        # the export reads the same files, so the second read comes from the page cache. When
        # the step ends early (Ctrl-C, an error) the hash stops at its next block: the pool's
        # exit joins the thread, and so does the interpreter's exit (concurrent.futures
        # ``_python_exit``), which would otherwise wait for gigabytes to be hashed.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash-source") as pool:
            try:
                yield FetchedCheckpoint(step, folder, None, [], pool.submit(hash_all))
            finally:
                stop.set()
