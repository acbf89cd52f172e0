"""Gathering a parameter's segments (:mod:`exporter.neox.zero.gather`): the chunks equal the
segments read one by one, whatever the order of the segments in their files, the gaps between
them and the number of buffers one read may take; segments of mixed dtypes and files cut short
are refused with their names."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.dtypes import bfloat16
from exporter.errors import CheckpointFormatError, LayoutError
from exporter.neox.zero import gather
from exporter.neox.zero.common import FlatLayout
from exporter.neox.zero.gather import gather_chunks, span_table
from exporter.torchfile import TensorRef, load_torch_file


def _partitions(tmp_path: Path, files: int, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> list[list[TensorRef]]:
    """Per file, a list of 1-D tensors of varied sizes with distinct values (zip headers,
    and with ``exp_avg``/``exp_avg_sq`` alternating, other tensors, lie between them)."""
    rng = random.Random(seed)
    out = []
    for f in range(files):
        tensors = [(torch.arange(n, dtype=torch.float64) + 1000 * (f * 100 + i)).to(dtype)
                   for i, n in enumerate(rng.choice([1, 3, 17, 200, 1500, 5000])
                                         for _ in range(40))]
        path = tmp_path / f"rank{f}.pt"
        torch.save({"a": tensors[0::2], "b": tensors[1::2]}, path)
        obj = load_torch_file(path).obj
        out.append(obj["a"] + obj["b"])
    return out


def _layout(refs: list[list[TensorRef]], rng: random.Random) -> FlatLayout:
    """Spans of every tensor (some trimmed at the front or back), files interleaved, in an
    order that often goes backwards in a file."""
    spans = []
    for per_file in refs:
        for ref in per_file:
            start = rng.randrange(ref.numel) if ref.numel > 1 and rng.random() < 0.3 else 0
            spans.append((ref, start, rng.randint(1, ref.numel - start)))
    rng.shuffle(spans)
    return FlatLayout(spans)


def _reference(layout: FlatLayout, begin: int, count: int) -> np.ndarray:
    return np.concatenate([s.read() for s in layout.covering(begin, count, "ref")])


@pytest.mark.parametrize(("max_gap", "iov_max"), [(16 * 1024, 1024), (0, 1024), (1 << 22, 4),
                                                  (64, 2)])
def test_chunks_equal_the_segments_read_one_by_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_gap: int, iov_max: int) -> None:
    monkeypatch.setattr(gather, "MAX_GAP", max_gap)
    monkeypatch.setattr(gather, "IOV_MAX", iov_max)
    calls: list[int] = []
    scratch: list[int] = []
    real_preadv, real_scratch = os.preadv, gather._Reader._scratch

    def preadv(fd: int, buffers: list[memoryview], pos: int) -> int:
        calls.append(len(buffers))
        return real_preadv(fd, buffers, pos)

    def sized(self: gather._Reader, n: int) -> memoryview:
        scratch.append(n)
        return real_scratch(self, n)

    monkeypatch.setattr(gather.os, "preadv", preadv)
    monkeypatch.setattr(gather._Reader, "_scratch", sized)
    rng = random.Random(max_gap + iov_max)
    refs = _partitions(tmp_path, 3)
    # As the ZeRO files lay them out: the files' tensors in order, the files taking turns.
    turns = FlatLayout([(ref, 0, ref.numel) for group in zip(*refs, strict=True) for ref in group])
    calls.clear()
    chunk = list(gather_chunks(turns.covering(0, turns.total, "p"), "p")(1 << 30))
    reads = list(calls)
    assert np.array_equal(np.concatenate(chunk), _reference(turns, 0, turns.total))
    # Reads take several segments each where the gaps allow, never more buffers than allowed,
    # and the bytes between segments go to a scratch buffer of at most MAX_GAP bytes.
    assert max(reads) <= iov_max and max(scratch) <= max(max_gap, 1)
    if max_gap == 0:  # zip headers lie between any two tensors: one read each
        assert len(reads) == 3 * len(refs[0])
    elif max_gap >= 1 << 22:  # one read per file, cut at IOV_MAX buffers
        assert len(reads) == 3 * -(-len(refs[0]) // (iov_max // 2))
    layout = _layout(refs, rng)
    for _ in range(40):
        begin = rng.randrange(layout.total)
        count = rng.randint(1, layout.total - begin)
        max_bytes = rng.choice([4, 100, 4096, 65536])
        chunks = list(gather_chunks(layout.covering(begin, count, "p"), "p")(max_bytes))
        per_chunk = max(1, max_bytes // 4)
        assert [c.size for c in chunks[:-1]] == [per_chunk] * (len(chunks) - 1)
        assert 0 < chunks[-1].size <= per_chunk
        assert np.array_equal(np.concatenate(chunks), _reference(layout, begin, count))


def test_half_precision_segments_and_one_span_ranges(tmp_path: Path) -> None:
    refs = _partitions(tmp_path, 2, torch.bfloat16, seed=3)
    layout = _layout(refs, random.Random(1))
    table = span_table(layout)
    assert span_table(layout) is table  # made once per layout
    first = layout.spans[0]
    inside = layout.covering(1, first[2] - 1, "p")  # within the first span
    assert np.array_equal(np.concatenate(list(gather_chunks(inside, "p")(2))), _reference(layout, 1, first[2] - 1))
    whole = list(gather_chunks(layout.covering(0, layout.total, "p"), "p")(1 << 20))
    assert whole[0].dtype == bfloat16.numpy
    assert np.array_equal(np.concatenate(whole), _reference(layout, 0, layout.total))


def test_segments_of_different_dtypes_are_refused(tmp_path: Path) -> None:
    torch.save([torch.ones(10)], tmp_path / "f32.pt")
    torch.save([torch.ones(10, dtype=torch.float16)], tmp_path / "f16.pt")
    refs = [load_torch_file(tmp_path / f"{name}.pt").obj[0] for name in ("f32", "f16")]
    layout = FlatLayout([(ref, 0, ref.numel) for ref in refs])
    with pytest.raises(LayoutError, match="model.w: master segments of different dtypes"):
        list(gather_chunks(layout.covering(5, 10, "w"), "model.w: master")(1 << 20))


def test_a_file_cut_short_while_gathering_is_named(tmp_path: Path) -> None:
    refs = _partitions(tmp_path, 2)
    layout = FlatLayout([(ref, 0, ref.numel) for per_file in refs for ref in per_file])
    segments = layout.covering(0, layout.total, "p")
    chunks = gather_chunks(segments, "p")(1 << 20)
    os.truncate(tmp_path / "rank1.pt", refs[1][0].file_offset + 8)
    with pytest.raises(CheckpointFormatError, match=r"rank1\.pt: short read"):
        list(chunks)


def _resolved(table: gather.SpanTable) -> list[tuple[object, ...]]:
    return [(table.paths[f], table.dtypes[d], int(p), int(n)) for f, d, p, n in
            zip(table.file.tolist(), table.dtype_ids.tolist(), table.pos, table.sizes,
                strict=True)]


def test_a_table_made_rank_by_rank_equals_one_made_across_the_ranks(tmp_path: Path) -> None:
    # Three files of 40 tensors each; the second file's dtypes come in another order, so each
    # list numbers its dtypes differently.
    lists = []
    for f, dtypes in enumerate(([torch.float32], [torch.float16, torch.float32],
                                [torch.float32, torch.bfloat16])):
        tensors = [torch.arange(i + 1, dtype=dtypes[i % len(dtypes)]) for i in range(40)]
        torch.save(tensors, tmp_path / f"rank{f}.pt")
        lists.append(load_torch_file(tmp_path / f"rank{f}.pt").obj)
    layout = FlatLayout.whole([ref for group in zip(*lists, strict=True) for ref in group])
    across = gather.SpanTable(layout)
    by_rank = gather.SpanTable(layout, lists)
    assert _resolved(by_rank) == _resolved(across)
    assert [ref.path for ref in (lists[0][0], lists[1][0], lists[2][0])] == \
        [by_rank.paths[f] for f in by_rank.file[:3].tolist()]


def test_many_small_spans_are_gathered_a_block_of_chunks_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small spans cost a look-up and a read each: the chunks asked for are cut from blocks of
    # BLOCK_BYTES gathered at once; a parameter of large spans is still read chunk by chunk.
    monkeypatch.setattr(gather, "BLOCK_BYTES", 16384)
    fills: list[int] = []
    real = gather._Reader.fill

    def counted(self: gather._Reader, view: memoryview, *args: object) -> None:
        fills.append(view.nbytes)
        real(self, view, *args)

    monkeypatch.setattr(gather._Reader, "fill", counted)
    refs = _partitions(tmp_path, 3)
    small = FlatLayout([(ref, 0, ref.numel) for group in zip(*refs, strict=True) for ref in group])
    chunks = list(gather_chunks(small.covering(0, small.total, "p"), "p")(1024))
    assert [c.size for c in chunks[:-1]] == [256] * (len(chunks) - 1)
    assert np.array_equal(np.concatenate(chunks), _reference(small, 0, small.total))
    assert fills[:-1] == [16384] * (len(fills) - 1) and len(fills) == -(-small.total * 4 // 16384)
    fills.clear()
    torch.save([torch.arange(100_000, dtype=torch.float32)], tmp_path / "large.pt")
    large = FlatLayout([(load_torch_file(tmp_path / "large.pt").obj[0], 0, 100_000)])
    chunks = list(gather_chunks(large.covering(0, 100_000, "w"), "w")(1024))
    assert fills == [c.size * 4 for c in chunks] and len(chunks) == 391
    assert np.array_equal(np.concatenate(chunks), np.arange(100_000, dtype=np.float32))
