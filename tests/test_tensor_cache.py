"""The local tensor cache (:mod:`exporter.archive.cache`) stores entries whole or not at all."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from exporter.archive.cache import TensorCache


def test_a_failed_store_leaves_no_partial_entry(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache = TensorCache(tmp_path)
    data = b"tensor bytes" * 100
    key = "sha256/" + hashlib.sha256(data).hexdigest()
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fh: object) -> None:
            self.fh = fh

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()  # type: ignore[attr-defined]

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        cache.put(key, data)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert cache.get(key) is None
    monkeypatch.undo()
    cache.put(key, data)
    assert cache.get(key) == data
