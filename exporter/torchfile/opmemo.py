"""What the memo reads of a pickle share, for the prescan's fast path.

Part of :mod:`exporter.torchfile.opscan`, which holds the argument this serves. Every
BINGET/LONG_BINGET is resolved to the PUT it reads (the latest earlier PUT of its index, or
the n-th MEMOIZE for index n), and the value that PUT memoized to the opcode right before it,
which pushed the top of the stack. A GET may then read only:

- a *leaf*: a string, number, None or bool, GLOBAL, STACK_GLOBAL, BINPERSID or
  READONLY_BUFFER (the exact walker's ``_LEAF``), or EMPTY_TUPLE: weight 1, never changed;
- a *call result* (REDUCE, NEWOBJ, NEWOBJ_EX, OBJ): weight 1, and ``elems`` 0 as long as
  nothing is added to it, which the caller checks for the ones returned here;
- a *flat tuple*: TUPLE1/2/3 or MARK ... TUPLE whose items are all pushed by the opcodes
  right before it, each a leaf that pops nothing or a GET of a leaf or a call result, such
  as the ``betas`` pair every param group of a torch optimizer shares. The walker never
  changes a tuple, so reading one k-item tuple again costs what a fresh copy would: k + 1
  values more. :attr:`Sharing.extra` adds them up.

Anything else a GET reads (a list, dict or set, a nested tuple, a value memoized twice) makes
the fast path decline, as do a GET of an unset slot, a memo index out of range, and PUT and
MEMOIZE in one pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.torchfile.opbounds import CODE, Opcodes

_COMPOSITE, _LEAF, _CALL, _TUPLE = 0, 1, 2, 3
#: Leaves that pop nothing: as the opcodes right before a tuple opcode, they are its items.
ITEM_LEAVES = ("NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "LONG4",
               "BINFLOAT", "SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES", "BINBYTES",
               "BINBYTES8", "BYTEARRAY8", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
               "GLOBAL", "EMPTY_TUPLE")
_CLASSES = {**dict.fromkeys(ITEM_LEAVES, _LEAF),
            **dict.fromkeys(("BINPERSID", "READONLY_BUFFER", "STACK_GLOBAL"), _LEAF),
            **dict.fromkeys(("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ"), _CALL),
            **dict.fromkeys(("TUPLE1", "TUPLE2", "TUPLE3", "TUPLE"), _TUPLE)}
_BINPUT, _LONG_BINPUT, _MEMOIZE, _BINGET, _LONG_BINGET = 1, 2, 3, 4, 5
_ROLES = {"BINPUT": _BINPUT, "LONG_BINPUT": _LONG_BINPUT, "MEMOIZE": _MEMOIZE,
          "BINGET": _BINGET, "LONG_BINGET": _LONG_BINGET}


def _table(values: dict[str, int]) -> np.ndarray:
    out = np.zeros(256, np.int8)
    for name, value in values.items():
        out[CODE[name]] = value
    return out


_CLASS, _ROLE = _table(_CLASSES), _table(_ROLES)
_IS_ITEM = _table(dict.fromkeys(ITEM_LEAVES, 1)).astype(np.bool_)
_FIXED_ITEMS = _table({"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3})
IS_GET = _ROLE >= _BINGET


@dataclass(frozen=True)
class Sharing:
    """``calls``: the opcodes whose call results GETs read (with repeats); ``extra``: the
    values that reading the shared tuples adds, were each read a fresh copy; ``deep_gets``:
    the GETs that read a value tuples may nest in (a call result or a tuple, ``()`` included),
    and ``deep_sources`` the opcodes that pushed what they read.
    """

    calls: np.ndarray
    extra: int
    deep_gets: np.ndarray
    deep_sources: np.ndarray


def memo_reads(ops: Opcodes) -> Sharing | None:
    """What the GETs of ``ops`` read, or None to decline."""
    at = np.flatnonzero(_ROLE[ops.codes])
    role = _ROLE[ops.codes[at]]
    arg = ops.uint4(at)
    arg[(role == _BINPUT) | (role == _BINGET)] &= 0xFF
    is_put = role <= _LONG_BINPUT
    puts, index = at[is_put], arg[is_put]
    gets, wanted = at[role >= _BINGET], arg[role >= _BINGET]
    if ops.present[CODE["MEMOIZE"]]:
        if len(puts):
            return None
        puts = at[role == _MEMOIZE]
        index = np.arange(len(puts))
    elif (index > puts + 1).any():  # the walker: 0 <= arg <= opcodes so far (from 1)
        return None
    if not len(gets):
        none = np.zeros(0, np.int64)
        return Sharing(none, 0, none, none)
    setter = _latest_setter(puts, index, gets, wanted)
    if setter is None or (setter < 1).any():
        return None
    source = setter - 1  # the opcode whose value the PUT memoized (it pushed the top)
    kind = _CLASS[ops.codes[source]]
    if (kind == _COMPOSITE).any():
        return None
    extra = 0
    if (kind == _TUPLE).any():
        items = _flat_tuple_items(ops.codes, gets[kind != _TUPLE], source[kind == _TUPLE])
        if items is None:
            return None
        extra = int(items.sum())
    deep = (kind != _LEAF) | (ops.codes[source] == CODE["EMPTY_TUPLE"])
    return Sharing(source[kind == _CALL], extra, gets[deep], source[deep])


def _flat_tuple_items(codes: np.ndarray, plain_gets: np.ndarray,
                      tuples: np.ndarray) -> np.ndarray | None:
    """The item count of each tuple opcode at ``tuples``, or None if one is not flat.

    ``plain_gets``: the GETs that read a leaf or a call result, which may be items too.
    """
    if (tuples < 1).any():
        return None
    item = _IS_ITEM[codes]
    item[plain_gets] = True
    other = np.where(item, -1, np.arange(len(codes)))
    np.maximum.accumulate(other, out=other)
    before = other[tuples - 1]  # the latest opcode before each tuple that is not an item
    run = tuples - 1 - before
    fixed = _FIXED_ITEMS[codes[tuples]]
    marked = (before >= 0) & (codes[np.maximum(before, 0)] == CODE["MARK"])
    if not np.where(fixed > 0, run >= fixed, marked).all():
        return None
    return np.where(fixed > 0, fixed, run)


def _latest_setter(puts: np.ndarray, index: np.ndarray, gets: np.ndarray,
                   wanted: np.ndarray) -> np.ndarray | None:
    """For each GET, the latest earlier PUT of its index; None if one has none."""
    if not len(puts):
        return None
    if (np.diff(index) > 0).all():  # each index set once (what picklers write)
        slot = np.full(int(index.max()) + 1, -1, np.int64)
        slot[index] = puts
        setter = slot[np.minimum(wanted, len(slot) - 1)]
        setter[wanted >= len(slot)] = -1
    else:  # events by (index, position); each GET takes the PUT before it, if of its index
        when = np.concatenate([puts, gets])
        slots = np.concatenate([index, wanted])
        order = np.lexsort((when, slots))
        is_put = order < len(puts)
        last = np.where(is_put, np.arange(len(order)), -1)
        np.maximum.accumulate(last, out=last)
        at_get = np.flatnonzero(~is_put)
        prior = last[at_get]
        put = order[np.maximum(prior, 0)]
        same = (prior >= 0) & (slots[put] == slots[order[at_get]])
        setter = np.empty(len(gets), np.int64)
        setter[order[at_get] - len(puts)] = np.where(same, when[put], -1)
    if (setter < 0).any() or (setter >= gets).any():
        return None
    return setter
