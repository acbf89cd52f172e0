"""Chunks read straight into a direct file's staging buffer (:meth:`DirectFile.place`): the
file holds the same bytes as when every chunk is copied in, the bytes read into place are not
copied again, and what cannot be placed (a cast, a tensor at an offset its dtype cannot start
at, a region larger than a buffer) is copied as before."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.convert.direct import BLOCK, DirectFile
from exporter.convert.stream import Converter, FileTask
from exporter.neox.model import Merge, Shard, merged_chunks
from exporter.neox.zero.common import FlatLayout
from exporter.neox.zero.gather import gather_chunks
from exporter.records import TensorJob, chunk_buffer, chunks_of, takes_place
from exporter.torchfile import TensorRef, load_torch_file


def _direct(path: Path, staging_bytes: int) -> DirectFile:
    found = DirectFile.create(path, staging_bytes)
    if found is None:
        pytest.skip(f"{path.parent}: the file system refuses O_DIRECT")
    return found


@pytest.mark.parametrize("seed", range(4))
def test_placed_and_copied_writes_give_the_bytes_in_order(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(40 * BLOCK + 321)
    path = tmp_path / "out.bin"
    out = _direct(path, staging_bytes=4 * BLOCK)  # small: buffers turn often
    pos = copied = 0
    while pos < len(data):
        size = min(len(data) - pos, rng.choice([1, 8, 100, BLOCK - 8, BLOCK, 2 * BLOCK + 16,
                                                3 * BLOCK, 5 * BLOCK]))
        piece = data[pos : pos + size]
        region = out.place(size) if rng.random() < 0.6 else None
        if size > 3 * BLOCK:
            assert region is None  # more than a buffer takes after a partial block
        if region is None:
            assert out.write(memoryview(piece)) == size
            copied += size
        else:
            region[:] = memoryview(piece)
            cut = rng.randrange(size + 1)  # a prefix, then the rest: each where it lies
            for part in (region[:cut], region[cut:]):
                if part.size:
                    assert out.write(part) == part.size
        pos += size
        assert out.tell() == pos
        if rng.random() < 0.15:
            out.flush()
            assert path.read_bytes() == data[:pos]
    out.flush()
    out.close()
    assert path.read_bytes() == data
    assert out.copied_bytes == copied


def test_a_region_that_does_not_fit_moves_the_partial_block_to_the_other_buffer(
        tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    out = _direct(path, staging_bytes=3 * BLOCK)
    head = bytes(range(256)) * 20  # 5120 bytes: one whole block and 1024 more
    out.write(head)
    region = out.place(2 * BLOCK)  # 5120 + 8192 > 12288: the first block goes out now
    assert region is not None
    region[:] = 7
    out.write(region)
    assert out.tell() == len(head) + 2 * BLOCK
    assert out.place(0) is None
    out.flush()
    out.close()
    assert path.read_bytes() == head + bytes([7]) * (2 * BLOCK)
    assert out.copied_bytes == len(head)


def _saved(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, TensorRef]:
    torch.save(tensors, tmp_path / "source.pt")
    return load_torch_file(tmp_path / "source.pt").obj


def _write(folder: Path, jobs: list[TensorJob], direct_io: bool, dtype: torch.dtype | None = None,
           ) -> tuple[bytes, list[DirectFile]]:
    opened: list[DirectFile] = []
    create = DirectFile.create

    def keep(path: Path) -> DirectFile | None:
        found = create(path)
        if found is not None:
            opened.append(found)
        return found

    folder.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setattr(DirectFile, "create", staticmethod(keep))
    try:
        Converter(chunk_bytes=3000, direct_io=direct_io, dtype=dtype).write_files(
            [FileTask(folder / "w.safetensors", jobs)], folder)
    finally:
        mp.undo()
    return (folder / "w.safetensors").read_bytes(), opened


def test_the_converter_reads_chunks_into_place_and_writes_the_same_file(tmp_path: Path) -> None:
    _direct(tmp_path / "probe.bin", BLOCK).close()
    torch.manual_seed(0)
    refs = _saved(tmp_path, {
        "a": torch.randn(5000),
        "odd": torch.arange(7, dtype=torch.uint8),  # the next float starts off its alignment
        "b": torch.randn(300, 11),
        "h": torch.randn(4001).half(),
        "c": torch.randn(2, 2).t(),  # not contiguous: read whole, then copied
    })
    jobs = [TensorJob(k, "model", r.dtype, r.shape, r.iter_chunks) for k, r in refs.items()]
    assert all(takes_place(j.chunks) for j in jobs)
    placed, opened = _write(tmp_path / "direct", jobs, direct_io=True)
    cached, _ = _write(tmp_path / "cached", jobs, direct_io=False)
    assert placed == cached
    (out,) = opened
    header = int.from_bytes(placed[:8], "little") + 8
    # Copied: the header, and what follows the 7 bytes at offsets odd for its dtype (the
    # float32, float16 and transposed tensors); the bytes themselves go anywhere.
    assert out.copied_bytes == header + 300 * 11 * 4 + 4001 * 2 + 16


def test_a_cast_is_copied_and_gives_the_same_file(tmp_path: Path) -> None:
    _direct(tmp_path / "probe.bin", BLOCK).close()
    refs = _saved(tmp_path, {"w": torch.randn(9000)})
    jobs = [TensorJob("w", "model", torch.float32, (9000,), refs["w"].iter_chunks)]
    placed, opened = _write(tmp_path / "direct", jobs, direct_io=True, dtype=torch.bfloat16)
    cached, _ = _write(tmp_path / "cached", jobs, direct_io=False, dtype=torch.bfloat16)
    assert placed == cached
    assert opened[0].copied_bytes == len(placed)


def test_gathered_segments_are_read_into_place(tmp_path: Path) -> None:
    _direct(tmp_path / "probe.bin", BLOCK).close()
    refs = _saved(tmp_path, {"p": [torch.arange(n, dtype=torch.float32) + 10_000 * i
                                   for i, n in enumerate([3000, 1, 4500, 17, 2600])]})["p"]
    layout = FlatLayout.whole(refs)
    whole = torch.cat([r.read() for r in refs])
    total = whole.numel()
    jobs = [TensorJob("x", "master", torch.float32, (total - 1000,),
                      gather_chunks(layout.covering(500, total - 1000, "x"), "x"))]
    assert takes_place(jobs[0].chunks)
    placed, opened = _write(tmp_path / "direct", jobs, direct_io=True)
    cached, _ = _write(tmp_path / "cached", jobs, direct_io=False)
    assert placed == cached
    header = int.from_bytes(placed[:8], "little") + 8
    assert opened[0].copied_bytes == header
    data = torch.frombuffer(bytearray(placed[header:]), dtype=torch.float32)
    assert torch.equal(data, whole[500 : total - 500])


def test_a_merge_takes_place_only_when_it_passes_its_shards_chunks_on(tmp_path: Path) -> None:
    refs = _saved(tmp_path, {"a": torch.ones(4, 3), "b": torch.zeros(4, 3)})
    shards = [Shard(r.shape, r.element_size, r.iter_chunks, r.read_range) for r in refs.values()]
    assert takes_place(merged_chunks(shards, Merge.CONCAT_DIM0))
    assert takes_place(merged_chunks(shards[:1], Merge.CONCAT_DIM1))
    assert not takes_place(merged_chunks(shards, Merge.CONCAT_DIM1))
    assert not takes_place(merged_chunks(shards, Merge.REPLICATED))
    assert not takes_place(chunks_of(torch.ones(3)))
    memory = np.zeros(48, dtype=np.uint8)
    seen = [(c.ctypes.data, c.tolist())
            for c in merged_chunks(shards, Merge.CONCAT_DIM0)(48, lambda n: memory[:n])]
    assert seen == [(memory.ctypes.data, [1.0] * 12), (memory.ctypes.data, [0.0] * 12)]


def test_a_chunk_buffer_without_a_place_is_new_memory() -> None:
    memory = np.zeros(8, dtype=np.uint8)
    assert chunk_buffer(8, lambda n: memory[:n]).ctypes.data == memory.ctypes.data
    assert chunk_buffer(8, lambda n: None).ctypes.data != memory.ctypes.data
    assert chunk_buffer(8, None).size == 8
    assert chunk_buffer(0, lambda n: memory[:n]).size == 0


def test_an_engine_that_holds_chunks_gets_no_staging_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that takes the next chunk before the last is written (the GPU's, which
    pipelines its copies) must not be fed chunks in memory the next read would overwrite."""
    _direct(tmp_path / "probe.bin", BLOCK).close()
    from exporter.convert.engines import CpuCastEngine

    monkeypatch.setattr(CpuCastEngine, "passes_through", False)
    refs = _saved(tmp_path, {"w": torch.randn(9000)})
    jobs = [TensorJob("w", "model", torch.float32, (9000,), refs["w"].iter_chunks)]
    placed, opened = _write(tmp_path / "direct", jobs, direct_io=True)
    assert opened[0].copied_bytes == len(placed)
