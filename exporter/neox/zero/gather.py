"""Gather a parameter's segments into chunks with a few vectored reads per chunk.

A parameter of a many-interval partition (DeeperSpeed stage 1 with a small bucket) is
thousands of segments of a few kB, alternating between the rank files. Reading them with one
``preadv`` each cost a system call and a release and re-take of the GIL per segment: with a
step's optimizer files written on several threads at once, the threads queued for the GIL
after every read, and gathering took longer on three threads than on one.

Here the segments of one chunk are found with numpy from the layout's span table
(:class:`SpanTable`), grouped by file, and each file's run of nearby segments is read with one
``preadv``: its buffers are each segment's place in the chunk, and a scratch buffer for the
bytes between two segments (zip headers, or the other moment's interval, when they are close:
up to :data:`MAX_GAP` bytes). ``os.preadv`` takes at most ``IOV_MAX`` buffers; a run is cut
there. A parameter of many small spans is gathered a block of several chunks at a time
(:data:`BLOCK_BYTES`), the chunks then cut from it: with chunks of a megabyte, finding the
pieces and reading them cost as much again as the bytes. A read that comes back short is
read again segment by segment, whose error names the file (a file truncated while it is
read).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterator
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.errors import LayoutError
from exporter.records import Place, chunk_buffer, reads_into
from exporter.torchfile.records import read_exact

if TYPE_CHECKING:
    from exporter.dtypes import DType
    from exporter.neox.zero.common import FlatLayout, Segments
    from exporter.torchfile import TensorRef

#: Bytes between two segments of one file that are read (into a scratch buffer) rather than
#: skipped with a second system call: copying 16 KiB costs about what a call does.
MAX_GAP = 16384
#: A parameter whose spans average fewer bytes than this is gathered in blocks of
#: :data:`BLOCK_BYTES` (a whole number of chunks), each cut into the chunks asked for.
FRAGMENT_BYTES = 256 << 10
BLOCK_BYTES = 2 << 20
#: Buffers per ``preadv`` (POSIX's IOV_MAX; Linux allows 1024).
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 16


class SpanTable:
    """A :class:`FlatLayout`'s spans as arrays: where each span starts in the flat sequence,
    how many elements it has, and the file, byte offset and dtype of its first element.

    ``turns``: the layout is :meth:`FlatLayout.in_turns` of these lists' tensors taken in turns
    (the first of each list, then the second of each, ...: DeeperSpeed's sub-partitions, the
    ranks taking turns). The lists are then read one by one, in the order their tensors were
    made, and the columns interleaved with numpy: the records of one file lie together in
    memory, and reading them in that order takes half the time of reading across the files.
    """

    __slots__ = ("starts", "flat", "sizes", "pos", "file", "dtype_ids", "paths", "dtypes")

    def __init__(self, layout: FlatLayout, turns: list[list[TensorRef]] | None = None,
                 made: list[tuple[Any, ...] | None] | None = None) -> None:
        # C-level maps over the spans: a many-interval layout has tens of thousands, and a
        # Python loop over them costs about 1 µs a span.
        spans = layout.spans
        if turns is None:
            columns = [columns_of(list(map(itemgetter(0), spans)))]
            starts = np.fromiter(map(itemgetter(1), spans), np.int64, len(spans))
        else:
            made = made or [None] * len(turns)
            columns = [columns_of(refs) if ready is None else ready
                       for refs, ready in zip(turns, made, strict=True)]
            starts = np.zeros(len(spans), dtype=np.int64)

        def joined(i: int) -> np.ndarray:
            parts = [c[i] for c in columns]
            return parts[0] if turns is None else np.stack(parts, axis=1).ravel()

        paths: dict[int, Any] = {}
        dtypes: dict[DType, int] = {}
        for column in columns:
            paths.update(column[4])
            for dtype in column[5]:
                dtypes.setdefault(dtype, len(dtypes))
        path_ids = np.array(list(paths), dtype=np.int64)
        order = np.argsort(path_ids)
        file_of_id = joined(0)
        self.paths = [paths[key] for key in path_ids[order].tolist()]
        self.file = np.searchsorted(path_ids[order], file_of_id).astype(np.int32)
        self.dtypes = list(dtypes)
        self.dtype_ids = _dtype_index(joined(1), columns, self.dtypes)
        itemsizes = np.array([dtype.itemsize for dtype in self.dtypes], dtype=np.int64)
        self.starts = layout.starts
        self.flat = np.array(layout.starts, dtype=np.int64)
        self.sizes = layout.span_sizes()
        self.pos = joined(3) + (joined(2) + starts) * itemsizes[self.dtype_ids]


def columns_of(refs: list[TensorRef]) -> tuple[Any, ...]:
    """The columns :class:`SpanTable` takes of one list of tensors (also made ahead of the
    table, for its ``made``). For each of ``refs``: the id of its file's path, its dtype's
    index in the returned dtypes, its storage offset and its storage's file offset; then the
    paths by id and the dtypes seen (in order); then each one's element count."""
    count = len(refs)
    storages = list(map(attrgetter("storage"), refs))
    path_objects = list(map(attrgetter("path"), storages))
    # The common case, one file's records of one dtype: no column of ids or dtypes to make.
    if len(set(map(id, path_objects))) == 1:
        paths = {id(path_objects[0]): path_objects[0]}
        ids = np.full(count, id(path_objects[0]), dtype=np.int64)
    else:
        paths = dict(zip(map(id, path_objects), path_objects, strict=True))
        ids = np.fromiter(map(id, path_objects), np.int64, count)
    seen = list(set(map(attrgetter("dtype"), storages)))
    if len(seen) == 1:
        dtype_index = np.zeros(count, dtype=np.int32)
    else:
        dtype_list = list(map(attrgetter("dtype"), storages))
        seen = list(dict.fromkeys(dtype_list))
        index = {dtype: i for i, dtype in enumerate(seen)}
        dtype_index = np.fromiter(map(index.__getitem__, dtype_list), np.int32, count)
    offsets = np.fromiter(map(attrgetter("offset"), refs), np.int64, count)
    file_offsets = np.fromiter(map(attrgetter("file_offset"), storages), np.int64, count)
    numels = np.fromiter(map(attrgetter("numel"), refs), np.int64, count)
    return ids, dtype_index, offsets, file_offsets, paths, seen, numels


def _dtype_index(local: np.ndarray, columns: list[tuple[Any, ...]], dtypes: list[Any]) -> np.ndarray:
    """Indices into ``dtypes`` from each list's own dtype indices (``local``, interleaved as
    the spans are), where the lists saw their dtypes in different orders."""
    if all(column[5] == dtypes[: len(column[5])] for column in columns):
        return local  # every list saw the dtypes in the common order: the same indices
    where = {dtype: i for i, dtype in enumerate(dtypes)}
    width = len(columns)
    out = np.empty_like(local)
    for j, column in enumerate(columns):
        remap = np.array([where[d] for d in column[5]], dtype=np.int32)
        part = local[j::width] if width > 1 else local
        out[j::width] = remap[part]
    return out


def span_table(layout: FlatLayout, turns: list[list[TensorRef]] | None = None,
               made: list[tuple[Any, ...] | None] | None = None) -> SpanTable:
    """The layout's span table, made on first use (from ``turns`` if given: see
    :class:`SpanTable`; ``made``: the columns of those lists made before, by
    :func:`columns_of`, None for a list whose columns are made here) and kept with the
    layout."""
    table = layout.__dict__.get("_table")
    if table is None:
        table = layout.__dict__["_table"] = SpanTable(layout, turns, made)
    return table


def gather_chunks(segments: Segments, what: str) -> Callable[[int], Iterator[np.ndarray]]:
    """Chunks of about ``max_bytes`` of a parameter's elements (``segments``), each gathered
    from the segments it spans; ``what`` names the parameter in errors."""

    @reads_into
    def gen(max_bytes: int, place: Place | None = None) -> Iterator[np.ndarray]:
        if not segments:
            return
        table = span_table(segments.layout)
        begin, end = segments.begin, segments.begin + segments.count
        first = bisect.bisect_right(table.starts, begin) - 1
        dtype_id = int(table.dtype_ids[first])
        dtype = table.dtypes[dtype_id]
        size = dtype.itemsize
        per_chunk = max(1, max_bytes // size)
        # Many small spans: gathered a block of several chunks at a time, so that the cost of
        # finding the pieces and of each read is spread over more bytes.
        spans = bisect.bisect_left(table.starts, end) - first
        per_block = per_chunk
        if spans * FRAGMENT_BYTES > (end - begin) * size:
            per_block = max(per_chunk, BLOCK_BYTES // size // per_chunk * per_chunk)
        reader = _Reader(table)
        try:
            while begin < end:
                count = min(per_block, end - begin)
                out = chunk_buffer(count * size, place)
                reader.fill(memoryview(out), begin, begin + count, dtype_id, what)
                begin += count
                block = out.view(dtype.numpy)
                for at in range(0, count, per_chunk):
                    yield block[at : at + per_chunk]
        finally:
            reader.close()

    return gen


class _Reader:
    """The open files of one tensor's gathering, and its scratch buffer."""

    def __init__(self, table: SpanTable) -> None:
        self.table = table
        self.fds: dict[int, int] = {}
        self.scratch: memoryview | None = None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _fd(self, file: int) -> int:
        fd = self.fds.get(file)
        if fd is None:
            fd = self.fds[file] = os.open(self.table.paths[file], os.O_RDONLY)
        return fd

    def fill(self, view: memoryview, begin: int, end: int, dtype_id: int, what: str) -> None:
        """Read flat elements ``[begin, end)`` into ``view``."""
        t = self.table
        lo = bisect.bisect_right(t.starts, begin) - 1
        hi = bisect.bisect_left(t.starts, end)
        size = t.dtypes[dtype_id].itemsize
        if hi - lo == 1:  # one span: one read
            if int(t.dtype_ids[lo]) != dtype_id:
                raise LayoutError(f"{what} segments of different dtypes")
            pos = int(t.pos[lo]) + (begin - t.starts[lo]) * size
            self._read(int(t.file[lo]), [view], pos, view.nbytes, [view], [pos])
            return
        if (t.dtype_ids[lo:hi] != dtype_id).any():
            raise LayoutError(f"{what} segments of different dtypes")
        # The pieces (each span's part of the chunk), file by file, in chunk order per file.
        flat = t.flat[lo:hi]
        first = np.maximum(flat, begin)
        counts = np.minimum(flat + t.sizes[lo:hi], end) - first
        keep = np.flatnonzero(counts > 0)
        order = keep[np.argsort(t.file[lo:hi][keep], kind="stable")]
        files = t.file[lo:hi][order]
        src = t.pos[lo:hi][order] + (first[order] - flat[order]) * size
        dst = (first[order] - begin) * size
        stop = src + counts[order] * size
        # Runs: one file, forward, gaps of at most MAX_GAP, at most IOV_MAX buffers.
        n = len(order)
        gaps = np.zeros(n, dtype=np.int64)
        gaps[1:] = src[1:] - stop[:-1]
        cut = np.ones(n, dtype=bool)
        cut[1:] = (files[1:] != files[:-1]) | (gaps[1:] < 0) | (gaps[1:] > MAX_GAP)
        runs = np.flatnonzero(cut)
        within = np.arange(n) - runs[np.cumsum(cut) - 1]
        cut |= within % (IOV_MAX // 2) == 0
        gaps[cut] = 0
        runs = np.flatnonzero(cut).tolist()
        # Buffers: each piece's place in the chunk, after the bytes before it (none for the
        # first of a run), so a run's buffers are one slice of this list.
        gap_list = gaps.tolist()
        scratch = self._scratch(max(gap_list))
        views = {g: scratch[:g] for g in set(gap_list)}
        targets = [view[a:b] for a, b in zip(dst.tolist(), (dst + stop - src).tolist(), strict=True)]
        buffers: list[memoryview] = [scratch] * (2 * n)
        buffers[0::2] = [views[g] for g in gap_list]
        buffers[1::2] = targets
        src_list, stop_list, file_list = src.tolist(), stop.tolist(), files.tolist()
        for a, b in zip(runs, [*runs[1:], n], strict=True):
            self._read(file_list[a], buffers[2 * a + 1 : 2 * b], src_list[a],
                       stop_list[b - 1] - src_list[a], targets[a:b], src_list[a:b])

    def _scratch(self, n: int) -> memoryview:
        if self.scratch is None or self.scratch.nbytes < n:
            self.scratch = memoryview(bytearray(max(n, 1)))
        return self.scratch

    def _read(self, file: int, buffers: list[memoryview], pos: int, want: int,
              targets: list[memoryview], positions: list[int]) -> None:
        fd = self._fd(file)
        if os.preadv(fd, buffers, pos) != want:
            for target, where in zip(targets, positions, strict=True):
                # Short (a file truncated while read): again piece by piece, for the error.
                read_exact(fd, target, where, self.table.paths[file])
