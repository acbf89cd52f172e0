"""The prescan's fast path: prove with numpy that the exact walker would accept a pickle.

:func:`exporter.torchfile.prescan.prescan` walks a pickle opcode by opcode (about a
microsecond each: a second for a DeepSpeed optimizer file of a million opcodes). Regular
pickles — what ``torch.save`` and ``pickle.dumps`` write — are proved acceptable here with
whole-array operations instead; whatever this module cannot prove it declines, and the exact
walker then decides, so refusals and their messages come from one place only.
:func:`proves_safe` returns True only if the exact walker would return without raising:

- *Parsing*: :func:`~exporter.torchfile.opbounds.opcode_starts` finds the opcodes genops
  yields, with every argument read and decoded as genops does, and a STOP.
- *Counts, memo indices, nesting*: at most ``max_opcodes`` opcodes; every BINPUT and
  LONG_BINPUT index in ``[0, n]`` at the n-th opcode (counted from 1, STOP included); MARK
  depth (a cumulative sum) never above ``max_depth`` and never below 0.
- *Stack*: each opcode finds enough values above the innermost MARK (the walker's ``pop`` and
  ``top``). Opcodes are grouped by frame — the span between a MARK and the opcode that pops
  to it, nested frames left out — by a stable sort on depth, so one segmented cumulative sum
  gives each frame's height before every opcode. POP, POP_MARK and DUP decline.
- *Memo*: every GET reads a slot set earlier, holding a leaf, a call result or a flat tuple
  (:mod:`exporter.torchfile.opmemo`).
- *Hashing work* (the walker's ``spend``). Its cost rules: a tuple's ``weight`` counts every
  value in its tuple tree (1 for anything else); SETITEM(S), DICT, ADDITEMS and FROZENSET
  spend the weight of each key or item; every item added to a list, dict, set or call result
  adds its weight to that target's ``elems`` (a tuple's ``elems`` is its weight less one);
  REDUCE, NEWOBJ, NEWOBJ_EX, OBJ and BUILD spend, for each argument, its ``elems`` and its
  children's. Amplification needs one value counted many times: a shared reference to a value
  whose weight or ``elems`` exceed one. Leaves never change (weight 1, ``elems`` 0), nor do
  call results nothing is added to — :meth:`_Frames.never_added_to` finds, for every APPEND,
  APPENDS, SETITEM, SETITEMS and ADDITEMS, the opcode that pushed its target, and declines if
  that is a shared call result or a GET — and a flat tuple costs what a fresh copy of it
  would. Count each shared tuple read as its k + 1 values: then every value sits on the stack
  once and is consumed once, and is counted at most twice — as a key or item hashed and in
  the ``elems`` of what it was added to, which is itself consumed once; or, inside a call
  argument's tuple tree, in that argument's ``elems`` and in its child's. Each opcode pushes
  at most one value, so ``work <= 2 * (opcodes + Sharing.extra)``, which must be within
  ``max_hash_work``.
- *Tuple nesting* (the walker's ``depth``: 1 + the deepest item for a tuple, the deepest
  popped argument for a call result, 0 for every other value; it refuses a tuple deeper than
  ``max_depth``). The *span* of a value is the stretch of the stream from the first opcode
  after the stack last stood no higher than where the value lies, through the opcode that
  pushed it (:meth:`_Frames.span_starts`; within its frame, the heights climb at most one an
  opcode, and a frame's MARK leaves it 0 high, so any earlier opcode of the frame, or the
  MARK, starts a span at least as long). Whatever an opcode pops was pushed inside its span,
  so a tuple's items and a call's arguments were pushed inside theirs, and spans nest or are
  apart. Follow the deepest item down from a tuple: through call results to the tuples,
  leaves and containers (0) or GETs they come from. Each tuple on the way lies inside the
  span of the one above it, so every opcode of the innermost span is covered by all of them:
  when no GET of a call result or tuple (``Sharing.deep_gets``) lies inside a tuple span,
  every tuple's depth is at most ``most``, the largest number of tuple spans covering one
  opcode (a cumulative sum of span starts and ends). Where such GETs lie inside tuple spans,
  the values they read must come from spans without any such GET: each is at most ``most``
  deep, and the bound is ``most`` plus the most tuple spans covering one of those GETs.
  Real pickles score a few levels; TUPLE1, TUPLE2 and TUPLE3 chains score their length.
"""

from __future__ import annotations

import numpy as np

from exporter.torchfile.opbounds import CODE, SUPPORTED, Opcodes, opcode_starts
from exporter.torchfile.opmemo import IS_GET, Sharing, memo_reads

#: Largest pickle the fast path takes on: its arrays peak at about 20 bytes per byte of
#: pickle (50 per opcode), as much as the exact walker's memo and far less than the objects
#: the unpickler then builds.
MAX_BYTES = 64 << 20
#: How often the exact walker can count one value when nothing that changes is shared.
WORK_PER_VALUE = 2

#: name: (values it needs above the innermost MARK, values it pops, values it pushes, MARK
#: depth change). Stack effects as listed in Lib/pickletools.py and as the exact walker
#: (``_Prescan.step`` in exporter/torchfile/prescan.py) checks them. Opcodes that pop to a
#: MARK act on the frame below it: they push their result there, and need one value there
#: when they add to it.
_EFFECTS: dict[str, tuple[int, int, int, int]] = {
    **dict.fromkeys(("NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1",
                     "LONG4", "BINFLOAT", "SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES",
                     "BINBYTES", "BINBYTES8", "BYTEARRAY8", "SHORT_BINUNICODE", "BINUNICODE",
                     "BINUNICODE8", "GLOBAL", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT",
                     "EMPTY_SET", "BINGET", "LONG_BINGET"), (0, 0, 1, 0)),
    **dict.fromkeys(("PROTO", "FRAME", "STOP"), (0, 0, 0, 0)),
    "MARK": (0, 0, 0, 1),
    **dict.fromkeys(("TUPLE", "LIST", "DICT", "FROZENSET", "OBJ"), (0, 0, 1, -1)),
    **dict.fromkeys(("APPENDS", "SETITEMS", "ADDITEMS"), (1, 0, 0, -1)),
    "TUPLE1": (1, 1, 1, 0), "TUPLE2": (2, 2, 1, 0), "TUPLE3": (3, 3, 1, 0),
    "APPEND": (2, 1, 0, 0), "SETITEM": (3, 2, 0, 0), "BUILD": (2, 1, 0, 0),
    "REDUCE": (2, 2, 1, 0), "NEWOBJ": (2, 2, 1, 0), "NEWOBJ_EX": (3, 3, 1, 0),
    "BINPERSID": (1, 1, 1, 0), "READONLY_BUFFER": (1, 1, 1, 0), "STACK_GLOBAL": (2, 2, 1, 0),
    **dict.fromkeys(("BINPUT", "LONG_BINPUT", "MEMOIZE"), (1, 0, 0, 0)),
}
#: Where an adding opcode's target sits, counted down from the frame height before it.
_TARGET_BELOW = {"APPEND": 2, "SETITEM": 3, "APPENDS": 1, "SETITEMS": 1, "ADDITEMS": 1}


def _table(values: dict[str, int]) -> np.ndarray:
    out = np.zeros(256, np.int8)
    for name, value in values.items():
        out[CODE[name]] = value
    return out


assert set(_EFFECTS) == SUPPORTED
_NEED, _POPS, _PUSH, _DEPTH = (_table({k: v[i] for k, v in _EFFECTS.items()}) for i in range(4))
_DELTA = _PUSH - _POPS
_BELOW = _table(_TARGET_BELOW)
_MARK = CODE["MARK"]
_TUPLE1, _TUPLE3 = CODE["TUPLE1"], CODE["TUPLE3"]  # TUPLE2 lies between them
_EMPTY_TUPLE, _TUPLE = CODE["EMPTY_TUPLE"], CODE["TUPLE"]
assert CODE["TUPLE2"] == _TUPLE1 + 1 and _TUPLE3 == _TUPLE1 + 2
#: Opcodes a tuple's span is searched back over, one at a time, before it is taken to start
#: with its MARK frame (a longer span, so a looser bound).
_SPAN_STEPS = 64


def proves_safe(data: bytes, max_opcodes: int, max_depth: int, max_hash_work: int) -> bool:
    """True if the exact walker, with these limits, would accept ``data``; False if this
    fast path cannot tell (the walker must then run)."""
    return accepted_opcodes(data, max_opcodes, max_depth, max_hash_work) is not None


def accepted_opcodes(data: bytes, max_opcodes: int, max_depth: int,
                     max_hash_work: int) -> Opcodes | None:
    """:func:`proves_safe`, giving the opcodes it parsed when it proves ``data`` safe."""
    if not 0 < len(data) <= MAX_BYTES:
        return None
    ops = opcode_starts(data, max_opcodes)
    if ops is None or not _proves(ops, max_opcodes, max_depth, max_hash_work):
        return None
    return ops


def _proves(ops: Opcodes, max_opcodes: int, max_depth: int, max_hash_work: int) -> bool:
    count = len(ops.codes)
    if count > max_opcodes or WORK_PER_VALUE * count > max_hash_work:
        return False
    depth = np.cumsum(_DEPTH[ops.codes], dtype=np.int32)
    if depth.min() < 0 or depth.max() > max_depth:
        return False
    frames = _Frames(ops.codes, depth)
    if not frames.heights_suffice():
        return False
    sharing = memo_reads(ops)
    if sharing is None or WORK_PER_VALUE * (count + sharing.extra) > max_hash_work:
        return False
    if frames.tuple_nesting(sharing) > max_depth:
        return False
    return not len(sharing.calls) or frames.never_added_to(sharing.calls)


class _Frames:
    """The opcodes in frame order: sorted by the MARK depth they act at, stably, so that each
    frame's opcodes are contiguous and in stream order, each frame led by its MARK."""

    def __init__(self, codes: np.ndarray, depth: np.ndarray) -> None:
        self.codes = codes
        if depth.max() == 0:
            self.order = np.arange(len(codes))
        else:
            narrow = depth.astype(np.int16) if depth.max() < 1 << 15 else depth
            self.order = np.argsort(narrow, kind="stable")  # a radix sort for 16-bit keys
        self.sorted = codes[self.order]
        self.delta = delta = _DELTA[self.sorted]
        total = np.cumsum(delta, dtype=np.int32)
        total -= delta  # values pushed less values popped before each opcode, frames in a row
        is_mark = self.sorted == _MARK
        base = np.concatenate([np.zeros(1, np.int32), total[is_mark]])
        #: Values above the innermost MARK before each opcode (in frame order).
        self.height = total - base[np.cumsum(is_mark, dtype=np.int32)]

    def heights_suffice(self) -> bool:
        return bool((self.height >= _NEED[self.sorted]).all())

    def tuple_nesting(self, sharing: Sharing) -> int:
        """A bound on how deeply the exact walker's tuples nest (see the module docstring),
        past any limit where it cannot say."""
        codes = self.sorted  # comparisons: faster than a table lookup per opcode
        at = np.flatnonzero(((codes >= _TUPLE1) & (codes <= _TUPLE3)) | (codes == _TUPLE)
                            | (codes == _EMPTY_TUPLE))
        if not len(at):
            return 0
        size = len(self.codes) + 1
        cover = np.bincount(self.span_starts(at), minlength=size)
        cover -= np.bincount(self.order[at] + 1, minlength=size)
        np.cumsum(cover, out=cover)
        most = int(cover.max())
        inside = cover[sharing.deep_gets] > 0
        if not inside.any():
            return most
        gets, sources = sharing.deep_gets, sharing.deep_sources[inside]
        rank = np.empty(len(self.order), np.int64)
        rank[self.order] = np.arange(len(self.order))
        first = self.span_starts(rank[sources])
        if (np.searchsorted(gets, sources, "right") > np.searchsorted(gets, first)).any():
            return size  # a value read inside a tuple holds a value read itself
        return most + int(cover[gets[inside]].max())

    def span_starts(self, at: np.ndarray) -> np.ndarray:
        """Where, in the stream, the value pushed by each opcode at ``at`` (in frame order)
        began: after the last earlier opcode of its frame that left the frame no higher than
        it lies, so that the nested frames in between are part of it. Past ``_SPAN_STEPS``
        opcodes, the frame's MARK, or the stream's start, stands in for that opcode."""
        after = self.height + self.delta
        level = self.height[at] - _POPS[self.sorted[at]]
        before = at - 1  # EMPTY_TUPLE and an opcode closing a frame stop here at once
        pending = np.flatnonzero(before >= 0)
        pending = pending[after[before[pending]] > level[pending]]
        for _ in range(_SPAN_STEPS):
            if not len(pending):
                break
            before[pending] -= 1
            back = before[pending]
            pending = pending[(back >= 0) & (after[np.maximum(back, 0)] > level[pending])]
        if len(pending):  # the frame's MARK leaves it 0 high: a span at least as long
            marks = np.append(-1, np.flatnonzero(self.sorted == _MARK))
            before[pending] = marks[np.searchsorted(marks, at[pending]) - 1]
        return np.where(before >= 0, self.order[np.maximum(before, 0)] + 1, 0)

    def never_added_to(self, shared_calls: np.ndarray) -> bool:
        """Whether no APPEND(S), SETITEM(S) or ADDITEMS adds to a shared call result, either
        directly or through a GET (which is declined whatever it read).

        The target of an adding opcode at height ``h`` of its frame was pushed by the last
        earlier opcode of that frame whose lowest touched height (height before, less what it
        pops) is at most ``h``: every later one leaves the value at ``h`` in place.
        """
        adds = np.flatnonzero(_BELOW[self.sorted])
        if not len(adds):
            return True
        lowest = self.height - _POPS[self.sorted]
        target = self.height[adds] - _BELOW[self.sorted[adds]]
        found = _last_at_or_below(lowest, adds - 1, target)
        if (found < 0).any():
            return False
        producer = self.order[found]
        code = self.codes[producer]
        banned = np.zeros(len(self.codes), np.bool_)
        banned[shared_calls] = True
        return not (banned[producer] | IS_GET[code] | (_PUSH[code] != 1)).any()


def _last_at_or_below(values: np.ndarray, start: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """For each query, the largest ``i <= start`` with ``values[i] <= limit`` (or -1).

    A sparse table of minima over blocks of 2**k ending at each index; a query steps back over
    whole blocks above its limit, the largest first (the step count's bits, high to low).
    """
    levels = [values]
    while (span := 1 << len(levels)) <= len(values):
        prev, half = levels[-1], span >> 1
        level = prev.copy()
        np.minimum(prev[half:], prev[:-half], out=level[half:])
        levels.append(level)
    pos = start.astype(np.int64)
    for k in range(len(levels) - 1, -1, -1):
        span = 1 << k
        skip = (pos - span + 1 >= 0) & (levels[k][np.maximum(pos, 0)] > limit)
        pos = np.where(skip, pos - span, pos)
    return pos
