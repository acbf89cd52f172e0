"""Output files written around the page cache (``O_DIRECT``), and the fall-back where a file
system refuses it: the same bytes either way."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import torch

from exporter.convert import direct
from exporter.convert.direct import BLOCK, DirectFile
from exporter.convert.stream import Converter, FileTask
from exporter.records import TensorJob, chunks_of


def _direct_or_skip(path: Path, staging_bytes: int = direct.STAGING_BYTES) -> DirectFile:
    found = DirectFile.create(path, staging_bytes)
    if found is None:
        pytest.skip(f"{path.parent}: the file system refuses O_DIRECT")
    return found


def test_any_sequence_of_writes_gives_the_bytes_in_order(tmp_path: Path) -> None:
    rng = random.Random(0)
    data = rng.randbytes(3 * 4096 * 7 + 123)
    path = tmp_path / "out.bin"
    out = _direct_or_skip(path, staging_bytes=3 * BLOCK)  # small: many buffer turns
    pos = 0
    while pos < len(data):
        size = rng.choice([0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 5, 5 * BLOCK])
        piece = data[pos : pos + size]
        assert out.write(memoryview(piece)) == len(piece)
        pos += len(piece)
        assert out.tell() == pos
        if rng.random() < 0.2:
            out.flush()  # mid-way: the file has its length, later writes continue it
            assert path.stat().st_size == pos
            assert path.read_bytes() == data[:pos]
    out.flush()
    out.close()
    assert path.read_bytes() == data


def test_converter_writes_the_same_files_with_and_without_direct_io(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _direct_or_skip(tmp_path / "probe.bin").close()
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(n) for i, n in enumerate([0, 1, 1000, 1_300_001, 17])}
    jobs = [TensorJob(name=k, kind="model", dtype=v.dtype, shape=tuple(v.shape),
                      chunks=chunks_of(v)) for k, v in tensors.items()]
    opened: list[DirectFile | None] = []
    create = DirectFile.create

    def counting(path: Path) -> DirectFile | None:
        opened.append(create(path))
        return opened[-1]

    monkeypatch.setattr(DirectFile, "create", staticmethod(counting))
    for name, use in (("direct", True), ("cached", False)):
        folder = tmp_path / name
        folder.mkdir()
        Converter(chunk_bytes=4096 + 4, direct_io=use).write_files(
            [FileTask(folder / "w.safetensors", jobs)], folder)
    assert len(opened) == 1 and isinstance(opened[0], DirectFile)
    assert (tmp_path / "direct" / "w.safetensors").read_bytes() == \
        (tmp_path / "cached" / "w.safetensors").read_bytes()


def test_a_file_system_that_refuses_o_direct_gets_an_ordinary_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refusing(path: str, flags: int, *args: int) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    assert DirectFile.create(tmp_path / "x.bin") is None
    values = torch.arange(10_000, dtype=torch.float32)
    job = TensorJob(name="w", kind="model", dtype=values.dtype, shape=(10_000,),
                    chunks=chunks_of(values))
    Converter().write_files([FileTask(tmp_path / "w.safetensors", [job])], tmp_path)
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], values)


def test_a_failed_background_write_fails_the_file_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = DirectFile.create(tmp_path / "probe.bin")
    if probe is None:
        pytest.skip("the file system refuses O_DIRECT")
    probe.close()
    calls = {"n": 0}
    real = os.pwrite

    def failing(fd: int, data: memoryview, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", failing)
    values = torch.zeros(3 << 20, dtype=torch.float32)  # 12 MiB: several staging buffers
    job = TensorJob(name="w", kind="model", dtype=values.dtype, shape=tuple(values.shape),
                    chunks=chunks_of(values))
    with pytest.raises(OSError, match="No space left"):
        Converter().write_files([FileTask(tmp_path / "w.safetensors", [job])], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.bin"]


@pytest.mark.parametrize("direct_io", [True, False])
def test_a_file_whose_last_bytes_fail_to_reach_the_disk_is_not_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_io: bool) -> None:
    """The final flush and fsync run as the writer closes, after every tensor was handed over:
    their failure must remove the file, not rename it into place."""
    if direct_io:
        _direct_or_skip(tmp_path / "probe.bin").close()
        (tmp_path / "probe.bin").unlink()

    def full_disk(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if direct_io:
        monkeypatch.setattr(DirectFile, "flush", full_disk)
    else:
        monkeypatch.setattr(os, "fsync", full_disk)
    values = torch.arange(1000, dtype=torch.float32)
    job = TensorJob(name="w", kind="model", dtype=values.dtype, shape=(1000,),
                    chunks=chunks_of(values))
    with pytest.raises(OSError, match="No space left"):
        Converter(direct_io=direct_io).write_files(
            [FileTask(tmp_path / "w.safetensors", [job])], tmp_path)
    assert list(tmp_path.iterdir()) == []
