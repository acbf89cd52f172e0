"""A file whose pickle was read just before, byte for byte: rebuilt, not read again.

The data-parallel partition files of one ZeRO checkpoint hold one structure, and where the
ranks' partitions have one size, one pickle, byte for byte: only the storages' bytes differ,
and where they lie is each file's own zip directory. Unpickling the same bytes against another
file's zip gives the same tree, each storage record placed where that file's member is. So,
inside :func:`alike_files`, the tree is rebuilt from the records of the file read before (as
:mod:`exporter.torchfile.sendable` encodes them: the form a forked reader sends), after the
checks the unpickler makes of each storage (a stored member of that key, of the bytes the
record needs), or none at all where its zip has the first one's layout (every member, its
place and its header the same), or by each member's row where only the places moved (the same
names in the same order after a pickle of another size: :class:`_Members`); where one fails,
the file is read in full, and the reader's own message names the fault. The pickle's bytes are
the same, so the prescan's verdict is too.

The ranks at the ends of a group, whose sub-partitions have other sizes, have the pickle with
numbers of a few tensor records changed: rebuilt too, those records read again
(:mod:`exporter.torchfile.patched`).

Measured on the partition files of 36,369 tensors of one step, timed in an export: 0.41-0.74 s
for the first one read in full (zip container, prescan, unpickling), 0.08-0.17 s for one
rebuilt; a forked reader also skips encoding it (0.06 s). The two files of other sizes were
read in full before they were patched (0.35-0.42 s each), 0.08-0.15 s since. A reader that
takes only the columns of the long lists of records (``runs``: :mod:`exporter.torchfile.runs`)
has a rebuilt file in 0.017-0.02 s, the first patched one in 0.12 s (the encoding of the file
read in full made then, once).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.torchfile.patched import Remembered, patched_rows
from exporter.torchfile.sendable import ITEMSIZES, Decoder, Encoder, Unsendable
from exporter.torchfile.unpickler import replay
from exporter.torchfile.zipdir import OK

if TYPE_CHECKING:
    from exporter.torchfile import TorchFile
    from exporter.torchfile.container import TorchZip

#: Pickles smaller than this are read again: reading them costs less than comparing.
REMEMBER_FROM = 1 << 16


@dataclass(frozen=True)
class _Entry:
    """The last large pickle read inside :func:`alike_files`: its bytes, its file's tree or
    that tree's encoding once made, its zip's layout, and what a patched rebuild needs of it
    (None where its prescan did not parse it)."""

    data: bytes
    tree: Any
    encoded: tuple[Any, ...] | None
    layout: Any
    patch: Remembered | None
    members: _Members | None = None


class _Repeats:
    """The last large pickle read inside :func:`alike_files` (:class:`_Entry`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blocks = 0
        # Replaced whole, read without a lock.
        self.entry: _Entry | None = None

    def wants(self, data: bytes) -> bool:
        """Whether a pickle of these bytes, read in full, would be remembered."""
        return bool(self.blocks) and len(data) >= REMEMBER_FROM

    def rebuild(self, data: bytes, zip_: TorchZip, runs: bool = False
                ) -> tuple[Any, dict[str, bool], tuple[Any, ...]] | None:
        """The tree, globals and encoding of the file ``zip_`` whose pickle is ``data``, when
        that pickle is the one remembered, or that one with numbers of tensor records changed
        (:mod:`exporter.torchfile.patched`), and every storage fits this file; else None.
        ``runs``: long lists of records left as :class:`~exporter.torchfile.runs.RecordRun`."""
        entry = self.entry
        if entry is None or len(data) < REMEMBER_FROM:
            return None
        same = entry.data == data
        if not same and entry.patch is None:
            return None
        entry = self._encoded(entry)
        if entry is None or entry.encoded is None:
            return None
        tree, refs, storages, globals_ = entry.encoded
        layout = zip_.layout()
        if layout == entry.layout:  # each storage where the remembered one holds it
            placed = storages
        elif layout[0] == entry.layout[0] and (members := self._members(entry)) is not None:
            placed = members.placed(storages, layout)
        else:
            placed = _placed(storages, zip_)
        if placed is None:
            return None
        if not same:
            assert entry.patch is not None  # kept with the encoding
            refs = patched_rows(entry.patch, data, zip_, refs, placed, lambda run: replay(run, zip_))
            if refs is None:
                return None
        obj = Decoder(zip_.path, refs, placed, runs).decode(tree)
        return obj, dict(globals_), (tree, refs, placed, globals_)

    def _encoded(self, entry: _Entry) -> _Entry | None:
        """``entry`` with its encoding, made once (then its tree is dropped); None if its tree
        cannot be encoded."""
        if entry.encoded is not None:
            return entry
        encoder = Encoder()
        try:
            encoded = encoder.encode_file(entry.tree)
        except (Unsendable, RecursionError):
            self.entry = None
            return None
        self.entry = entry = _with_encoding(entry, encoded, encoder.ref_index)
        return entry

    def _members(self, entry: _Entry) -> _Members | None:
        """The entry's :class:`_Members`, made the first time a zip's members moved."""
        if entry.members is None and entry.encoded is not None:
            members = _Members.of(entry.encoded[2], entry.layout)
            if members is not None and self.entry is entry:
                self.entry = replace(entry, members=members)
            return members
        return entry.members

    def remember(self, data: bytes, tf: TorchFile, zip_: TorchZip, patch: Remembered | None) -> None:
        if self.wants(data):
            self.entry = _Entry(data, tf, None, zip_.layout(), patch)

    def encoded(self, tf: TorchFile, encoding: tuple[Any, ...], ref_index: dict[int, int]) -> None:
        """``tf``, the file remembered, was encoded (to be sent, its records placed by
        ``ref_index``): keep that, not its tree."""
        entry = self.entry
        if entry is not None and entry.tree is tf:
            self.entry = _with_encoding(entry, encoding, ref_index)


def _with_encoding(entry: _Entry, encoded: tuple[Any, ...], ref_index: dict[int, int]) -> _Entry:
    """``entry`` holding ``encoded`` instead of its tree. ``ref_index`` (each record's place
    by ``id``) is only asked about the memo's values, which the patch keeps alive: their ids
    stay theirs."""
    patch = None if entry.patch is None else replace(entry.patch, ref_index=ref_index)
    return replace(entry, tree=None, encoded=encoded, patch=patch)


class _Members:
    """Where each encoded storage's member lies in the remembered zip's directory: a zip of the
    same member names in the same order, whose offsets moved (another pickle's size before
    them), holds each at the same row, found with numpy rather than by name."""

    def __init__(self, rows: np.ndarray, storages: list[tuple[Any, ...]]) -> None:
        self.rows = rows
        self.nbytes = np.fromiter((numel * ITEMSIZES[dtype] for _, dtype, numel, _, _ in storages),
                                  np.int64, len(storages))
        self.columns = [list(column) for column in zip(*storages, strict=True)][:4]

    @classmethod
    def of(cls, storages: list[tuple[Any, ...]], layout: Any) -> _Members | None:
        row_of = {name: row for row, name in enumerate(layout[0].split("\x00"))}
        rows = [row_of.get("/data/" + key, -1) for key, *_ in storages]
        if not storages or -1 in rows:
            return None
        return cls(np.array(rows, np.int64), storages)

    def placed(self, storages: list[tuple[Any, ...]], layout: Any) -> list[tuple[Any, ...]] | None:
        """The storage rows placed at this layout's offsets (its names the remembered ones),
        or None if a member is not stored whole or holds another size than its record."""
        offsets = np.frombuffer(layout[1], np.int64)[self.rows]
        sizes = np.frombuffer(layout[2], np.int64)[self.rows]
        status = np.frombuffer(layout[3], np.uint8)[self.rows]
        if not ((sizes == self.nbytes).all() and (status == OK).all()):
            return None
        return list(zip(*self.columns, offsets.tolist(), strict=True))


REPEATS = _Repeats()


@contextmanager
def alike_files() -> Iterator[None]:
    """Inside the block, a torch file whose pickle is the last one read is rebuilt from that
    one's records (the data-parallel partition files of one checkpoint); what was kept is
    dropped when the last such block ends."""
    with REPEATS.lock:
        REPEATS.blocks += 1
    try:
        yield
    finally:
        with REPEATS.lock:
            REPEATS.blocks -= 1
            if not REPEATS.blocks:
                REPEATS.entry = None


def _placed(storages: list[Any], zip_: TorchZip) -> list[tuple[Any, ...]] | None:
    """The storage records placed in ``zip_`` (each at its own member's data offset), or None
    if a member is missing, not stored, out of bounds or of another size than the record."""
    spans = zip_.storage_spans()
    placed = []
    for key, dtype, numel, location, _ in storages:
        span = spans.get(key)
        if span is None or span[1] != numel * ITEMSIZES[dtype]:
            return None
        placed.append((key, dtype, numel, location, span[0]))
    return placed


def encode_once(tf: TorchFile) -> tuple[Any, ...]:
    """``tf``'s tree encoded to be sent: the encoding it was rebuilt from, or a new one, kept
    for the next alike file."""
    if tf.encoded is not None:
        return tf.encoded
    encoder = Encoder()
    encoding = encoder.encode_file(tf)
    REPEATS.encoded(tf, encoding, encoder.ref_index)
    return encoding
