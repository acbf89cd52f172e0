"""A pickle that differs from one read before only in numbers of its tensor records.

The data-parallel partition files of one ZeRO checkpoint write one structure, and where the
flat groups do not split evenly, the ranks at the ends hold sub-partitions of other sizes:
their pickles are the others' with a few numbers changed (measured on DeeperSpeed files of
36,369 tensors: three ``BININT`` arguments, one of them one byte wider). Such a file is
rebuilt from the records of the file read before (:mod:`exporter.torchfile.repeats`), each
tensor record that holds a changed number read again on its own:

- :func:`number_sites`: the new pickle is the old one's opcodes, byte for byte, except
  number opcodes (``BININT``, ``BININT1``, ``BININT2``) whose values or widths differ; the
  opcodes come from the old pickle's prescan, so an opcode is never read inside an argument.
  Numbers steer nothing the prescan bounds (opcodes, memo indices, stack effects, nesting,
  hashing work), so the old pickle's verdict is the new one's.
- :func:`_window`: each such number lies in a run of opcodes that starts from an empty stack
  and ends with a ``REDUCE`` that leaves exactly one value: a tensor record, memoized right
  after. The run is replayed alone through the reader's own unpickler (its memo reads taken
  from the old pickle's memo: plain values that no later opcode sets again), and its record
  replaces the old one. Each value of the run is followed with whether a changed number went
  into it; no such value it memoizes may be read after it, nor may the run change anything
  made outside it (only the opcodes of leaves, tuples, memo reads and writes, persistent ids
  and calls are allowed): then nothing else of the tree depends on the changed numbers.
  Anything else, and the file is read in full.

Why by hand: no library diffs pickles; the alternative is reading every such file in full
(0.3 s each for the files above, against 0.07 s rebuilt).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.dtypes import DType
from exporter.torchfile.opbounds import CODE, Opcodes
from exporter.torchfile.records import StorageRef, TensorRef

if TYPE_CHECKING:
    from exporter.torchfile.container import TorchZip

#: Changed numbers past which a file is read in full: each costs a search of up to
#: :data:`MAX_RUN` starts, each followed for up to :data:`MAX_RUN` opcodes in Python (half a
#: second for all of them at most, whatever a hostile pickle holds).
MAX_SITES = 64
#: Opcodes a tensor record's run may span, and how far back from a number its start is sought.
MAX_RUN = 96
#: Bytes compared at a time while looking for the next difference.
_BLOCK = 1 << 16

_WIDTHS = {CODE["BININT"]: 4, CODE["BININT1"]: 1, CODE["BININT2"]: 2}
_GETS = {CODE["BINGET"]: 1, CODE["LONG_BINGET"]: 4}
_PUTS = {CODE["BINPUT"]: 1, CODE["LONG_BINPUT"]: 4}
_PUSH = frozenset(CODE[name] for name in (
    "BININT", "BININT1", "BININT2", "LONG1", "NONE", "NEWTRUE", "NEWFALSE", "BINFLOAT",
    "SHORT_BINUNICODE", "BINUNICODE", "SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES",
    "BINBYTES", "EMPTY_TUPLE", "GLOBAL", "BINGET", "LONG_BINGET"))
_POP_PUSH = {CODE["TUPLE1"]: 1, CODE["TUPLE2"]: 2, CODE["TUPLE3"]: 3, CODE["BINPERSID"]: 1,
             CODE["REDUCE"]: 2, CODE["STACK_GLOBAL"]: 2}
_MARK, _TUPLE, _REDUCE = CODE["MARK"], CODE["TUPLE"], CODE["REDUCE"]
#: What a run may read from the memo: values no opcode changes (no container of the tree).
_PLAIN = (str, int, float, bool, type(None))


@dataclass
class Remembered:
    """What a patched rebuild needs of the pickle read in full: its opcodes (from its
    prescan: their places and codes, which a pickle accepted as another shares with it) and
    its unpickler's memo, and, once encoded, where each tensor record went."""

    data: bytes
    ops: Opcodes
    memo: dict[int, Any]
    ref_index: dict[int, int] | None = None
    _slots: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def slots(self) -> tuple[np.ndarray, np.ndarray]:
        """For each memo slot, the index of the last opcode that sets it and of the last that
        reads it (-1: none). Read from this pickle's own bytes: ``ops`` may be those of a
        pickle it was accepted as, whose numbers differ."""
        if self._slots is None:
            size = max(self.memo, default=-1) + 2
            last_put, last_get = np.full(size, -1, np.int64), np.full(size, -1, np.int64)
            padded = np.frombuffer(self.data + bytes(8), np.uint8)
            for table, out in ((_PUTS, last_put), (_GETS, last_get)):
                for code, width in table.items():
                    at = np.flatnonzero(self.ops.codes == code)
                    arg = self.ops.starts[at] + 1
                    slot = sum(padded[arg + k].astype(np.int64) << (8 * k) for k in range(width))
                    keep = slot < size
                    np.maximum.at(out, slot[keep], at[keep])
            self._slots = (last_put, last_get)
        return self._slots


def number_sites(old: Remembered, new: bytes) -> list[tuple[int, int, int]] | None:
    """Each number opcode of ``old`` whose bytes differ in ``new``: (its index, and where it
    starts and ends in ``new``); None unless ``new`` is ``old`` with numbers changed."""
    a, b = np.frombuffer(old.data, np.uint8), np.frombuffer(new, np.uint8)
    starts, codes = old.ops.starts, old.ops.codes
    i = j = 0
    sites: list[tuple[int, int, int]] = []
    while True:
        k = _first_difference(a[i:], b[j:])
        if k is None:
            return sites if len(a) - i == len(b) - j else None
        op = int(np.searchsorted(starts, i + k, "right")) - 1
        width = _WIDTHS.get(int(codes[op])) if op >= 0 else None
        if width is None or len(sites) == MAX_SITES:
            return None
        start = int(starts[op])
        at = start + j - i
        other = _WIDTHS.get(int(b[at])) if at < len(b) else None
        if other is None or at + 1 + other > len(b):
            return None
        sites.append((op, at, at + 1 + other))
        i, j = start + 1 + width, at + 1 + other


def _first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    n = min(len(a), len(b))
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        found = np.flatnonzero(a[lo:hi] != b[lo:hi])
        if len(found):
            return lo + int(found[0])
    return None if len(a) == len(b) else n


def patched_rows(old: Remembered, new: bytes, zip_: TorchZip, refs: list[tuple[Any, ...]],
                 storages: list[tuple[Any, ...]],
                 replay: Callable[[bytes], Any]) -> list[tuple[Any, ...]] | None:
    """``refs`` (the encoded tensor records of ``old``'s tree) with each record that holds a
    number changed in ``new`` read again from ``new`` (``replay(pickle)`` unpickles a run
    through the reader), on the storage rows ``storages`` placed in ``zip_``; None where
    ``new`` must be read in full."""
    sites = number_sites(old, new)
    if sites is None or old.ref_index is None:
        return None
    shifts = _Shifts(old, sites)
    runs = {}
    changed = {op for op, _, _ in sites}
    for op in changed:
        run = _window(old, op, changed)
        if run is None:
            return None
        runs[run[:2]] = run
    rows = list(refs)
    for (first, last), (_, _, gets, slot) in runs.items():
        if any(other != (first, last) and other[0] <= last and first <= other[1] for other in runs):
            return None
        index = old.ref_index.get(id(old.memo.get(slot)))
        if index is None:
            return None
        ref = replay(_run_pickle(old, new, shifts, first, last, gets))
        # On the storage the old record was on (its persistent id is not among the changes).
        row = _row(ref, refs[index][0], storages, zip_) if type(ref) is TensorRef else None
        if row is None:
            return None
        rows[index] = row
    return rows


class _Shifts:
    """Where a byte of the old pickle lies in the new one, given the changed numbers' widths."""

    def __init__(self, old: Remembered, sites: list[tuple[int, int, int]]) -> None:
        ends = [int(old.ops.starts[op]) + 1 + _WIDTHS[int(old.ops.codes[op])] for op, _, _ in sites]
        self.ends = np.array(ends, np.int64)
        self.delta = np.cumsum([(stop - start) - (end - int(old.ops.starts[op]))
                                for (op, start, stop), end in zip(sites, ends, strict=True)])

    def at(self, pos: int) -> int:
        n = int(np.searchsorted(self.ends, pos, "right"))
        return pos + (int(self.delta[n - 1]) if n else 0)


def _run_pickle(old: Remembered, new: bytes, shifts: _Shifts, first: int, last: int,
                outside: list[int]) -> bytes:
    """Opcodes ``first..last`` of ``new`` as a pickle of their own, led by opcodes that put the
    values they read from before the run in the memo (the C unpickler's ``memo`` setter drops
    a dict's entries in CPython 3.11), its slots renumbered from 0."""
    starts, codes, data = old.ops.starts, old.ops.codes, old.data
    slots: dict[int, int] = {}
    parts = [b"\x80\x02"]
    for slot in outside:
        parts += [_pushed(old.memo[slot]), b"r", len(slots).to_bytes(4, "little"), b"0"]
        slots[slot] = len(slots)
    for i in range(first, last + 1):
        begin, end = shifts.at(int(starts[i])), shifts.at(int(starts[i + 1]))
        code = int(codes[i])
        width = _GETS.get(code) or _PUTS.get(code)
        if width is None:
            parts.append(new[begin:end])
            continue
        at = int(starts[i]) + 1
        slot = int.from_bytes(data[at : at + width], "little")
        if code in _PUTS:  # a slot of its own, whatever it held before
            slots[slot] = len(slots)
        parts += [b"j" if code in _GETS else b"r", slots[slot].to_bytes(4, "little")]
    parts.append(b".")
    return b"".join(parts)


def _pushed(value: Any) -> bytes:
    """Opcodes that push ``value`` (one :func:`_plain` accepts) as the reader reads it back."""
    from exporter.torchfile.unpickler import SafeGlobal, StorageType

    if isinstance(value, SafeGlobal):
        module, _, name = value.name.rpartition(".")
    elif isinstance(value, (StorageType, DType)):
        module, name = "torch", value.name
    else:
        out = io.BytesIO()
        pickler = pickle.Pickler(out, 2)
        pickler.fast = True  # no memo: the run's slots are the only ones
        pickler.dump(value)
        return out.getvalue()[2:-1]  # less PROTO and STOP
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _window(old: Remembered, op: int, changed: set[int]) -> tuple[int, int, list[int], int] | None:
    """The run around number opcode ``op`` that makes one memoized tensor record: (its first
    and last opcode, the memo slots it reads, the slot its value is kept in), checked to be
    replayable alone; None if there is none. ``changed``: the number opcodes that differ."""
    for first in range(op, max(op - MAX_RUN, -1), -1):
        found = _replayable(old, first, op, changed)
        if found is not None:
            return found
    return None


def _replayable(old: Remembered, first: int, op: int,
                changed: set[int]) -> tuple[int, int, list[int], int] | None:
    """Follow opcodes from ``first`` on the stack they build from nothing, each value marked
    with whether a changed number went into it, until a ``REDUCE`` past ``op`` leaves one."""
    codes, data, starts = old.ops.codes, old.data, old.ops.starts
    last_put, last_get = old.slots()
    stack: list[bool | None] = []  # None: a MARK; else whether a changed number went into it
    gets: list[int] = []  # slots read from before the run
    puts: list[int] = []  # slots given a value a changed number went into
    written: dict[int, bool] = {}
    for i in range(first, min(first + MAX_RUN, len(codes))):
        code = int(codes[i])
        if code in _GETS or code in _PUTS:
            width = _GETS.get(code) or _PUTS[code]
            slot = int.from_bytes(data[int(starts[i]) + 1 : int(starts[i]) + 1 + width], "little")
            if code in _PUTS:
                if not stack or stack[-1] is None:
                    return None
                written[slot] = stack[-1]
                if stack[-1]:
                    puts.append(slot)
                continue
            if slot not in written:
                gets.append(slot)
            stack.append(written.get(slot, False))
        elif code == _MARK:
            stack.append(None)
        elif code in _PUSH:
            stack.append(i in changed)
        elif code == _TUPLE:
            if None not in stack:
                return None
            mark = len(stack) - 1 - stack[::-1].index(None)
            stack[mark:] = [any(stack[mark + 1 :])]
        else:
            pops = _POP_PUSH.get(code)
            if pops is None or len(stack) < pops or None in stack[-pops:]:
                return None
            stack[-pops:] = [any(stack[-pops:])]
            if code == _REDUCE and len(stack) == 1 and i >= op:
                return _checked(old, first, i, gets, puts, last_put, last_get)
    return None


def _checked(old: Remembered, first: int, last: int, gets: list[int], puts: list[int],
             last_put: np.ndarray, last_get: np.ndarray) -> tuple[int, int, list[int], int] | None:
    """The run ``first..last`` if replaying it alone gives what the whole pickle did: each
    slot it reads holds, in the final memo, a plain value set before the run; nothing it
    memoizes that a changed number went into (``puts``) is read after it; its value is
    memoized right after it, in a slot never set again."""
    codes, size = old.ops.codes, len(last_put)
    after = last + 1
    if after >= len(codes) or int(codes[after]) not in _PUTS:
        return None
    width = _PUTS[int(codes[after])]
    at = int(old.ops.starts[after]) + 1
    slot = int.from_bytes(old.data[at : at + width], "little")
    if slot >= size or int(last_put[slot]) != after:
        return None
    for g in gets:
        if g >= size or not first > int(last_put[g]) >= 0 or not _plain(old.memo.get(g)):
            return None
    if any(p >= size or int(last_get[p]) > last for p in puts):
        return None
    return first, last, gets, slot


def _plain(value: Any) -> bool:
    """Whether ``value`` is one no opcode changes: a plain value, a reader function or type, or
    a tuple of plain values and such tuples."""
    from exporter.torchfile.unpickler import SafeGlobal, StorageType

    if type(value) is tuple:  # pickled by the stdlib's pickler (_pushed): plain items only
        return all(type(item) in _PLAIN or (type(item) is tuple and _plain(item))
                   for item in value)
    return type(value) in _PLAIN or isinstance(value, (SafeGlobal, StorageType, DType))


def _row(ref: TensorRef, index: int, storages: list[tuple[Any, ...]],
         zip_: TorchZip) -> tuple[Any, ...] | None:
    """``ref`` as an encoded record on placed storage row ``index``, if that row is the
    storage ``ref`` was read on."""
    storage: StorageRef = ref.storage
    if (tuple(storages[index][:5]) != (storage.key, str(storage.dtype), storage.numel,
                                       storage.location, storage.file_offset)
            or storage.path != zip_.path):
        return None
    return (index, ref.offset, ref.shape, ref.stride, ref.requires_grad, ref.numel)
