"""The walk over a pickle's opcodes that runs before any unpickling.

:func:`pickletools.genops` parses opcodes without executing anything. The walk bounds what the
C unpickler would otherwise do unchecked: memo indices (it sizes its memo table from the largest
index it sees, so ``LONG_BINPUT 2**31`` alone could exhaust memory), nesting, the number of
opcodes, and hashing work — it follows the stack symbolically, because a tuple holding the same
tuple twice, nested sixty times, is a few hundred bytes of pickle but 2**60 steps to hash, and
the C unpickler hashes every dict key and set item it builds. It also bounds how deeply tuples
nest: ``hash()`` of a tuple recurses in C into the tuples it holds without a recursion check,
so a dict key of 200,000 nested one-item tuples (a few hundred kilobytes of TUPLE1 opcodes,
no MARK) overflows the C stack and kills the process.

The data-parallel ranks of one ZeRO checkpoint, and the steps of one run, write pickles that
differ only in numbers: a partition's size, a step count. :class:`_Accepted` remembers the
last large pickles accepted, so that such a pickle is compared, not scanned again.
"""

from __future__ import annotations

import pickletools
from typing import Any

import numpy as np

from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile.opbounds import CODE, Opcodes
from exporter.torchfile.opscan import accepted_opcodes

MAX_OPCODES = 20_000_000
#: MARK nesting, and how deeply tuples nest in tuples (``hash()`` recurses through them).
MAX_DEPTH = 1_000
#: Elements hashed while building dict keys, set items and call arguments (tuples count
#: every element they reach through nested tuples, shared or not).
MAX_HASH_WORK = 10_000_000


class _Value:
    """What the prescan knows of one stack value: how much hashing it costs.

    ``weight``: the elements ``hash()`` visits (a tuple descends into the tuples it holds;
    anything else hashes in one step or fails at once). ``elems``: what hashing each element
    of this list, tuple or dict (its keys) costs, as ``set(x)`` or ``OrderedDict(x)`` would.
    ``depth``: how deeply tuples nest in it: 1 + the deepest item for a tuple, the deepest
    popped argument for a call result (the reader's ``_rebuild_parameter`` returns its first
    argument, ``_rebuild_from_type_v2`` an item of its third), 0 for anything else: lists,
    dicts and sets end a chain of tuples (they are not hashable, and no function the reader
    calls returns an item of one; ``torch.Size`` turns a list into a tuple only of integers).
    """

    __slots__ = ("weight", "elems", "children", "depth")

    def __init__(self, weight: int = 1, elems: int = 0, children: list[_Value] | None = None,
                 depth: int = 0):
        self.weight = weight
        self.elems = elems
        self.children = children
        self.depth = depth


_MARK = _Value()
_LEAF = _Value()  # any value that is neither a container nor a call result; never mutated
_CAP = MAX_HASH_WORK + 1

# Opcode kinds for the prescan (stack effects as listed in Lib/pickletools.py).
(_PUSH_LEAF, _NOTHING, _NEW_CONTAINER, _PUT, _GET, _MEMOIZE, _MARK_OP, _POP, _POP_MARK, _DUP,
 _TUPLE_N, _TUPLE_MARK, _APPEND, _SETITEM, _APPENDS, _SETITEMS, _ADDITEMS, _LIST, _DICT,
 _FROZENSET, _CALL2, _NEWOBJ_EX, _BUILD, _CALL_MARK, _POP1_PUSH, _POP2_PUSH, _STOP) = range(27)
_KINDS: dict[str, int] = {
    "PROTO": _NOTHING, "FRAME": _NOTHING, "STOP": _STOP,
    "EMPTY_LIST": _NEW_CONTAINER, "EMPTY_DICT": _NEW_CONTAINER, "EMPTY_SET": _NEW_CONTAINER,
    "PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "MEMOIZE": _MEMOIZE,
    "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET,
    "MARK": _MARK_OP, "POP": _POP, "POP_MARK": _POP_MARK, "DUP": _DUP,
    "EMPTY_TUPLE": _TUPLE_N, "TUPLE1": _TUPLE_N, "TUPLE2": _TUPLE_N, "TUPLE3": _TUPLE_N,
    "TUPLE": _TUPLE_MARK, "APPEND": _APPEND, "SETITEM": _SETITEM, "APPENDS": _APPENDS,
    "SETITEMS": _SETITEMS, "ADDITEMS": _ADDITEMS, "LIST": _LIST, "DICT": _DICT,
    "FROZENSET": _FROZENSET, "REDUCE": _CALL2, "NEWOBJ": _CALL2, "NEWOBJ_EX": _NEWOBJ_EX,
    "BUILD": _BUILD, "INST": _CALL_MARK, "OBJ": _CALL_MARK,
    "READONLY_BUFFER": _POP1_PUSH, "BINPERSID": _POP1_PUSH, "STACK_GLOBAL": _POP2_PUSH,
}
_TUPLE_SIZES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


class _Prescan:
    """Follows a pickle's stack symbolically: each value is a :class:`_Value`, never an object."""

    def __init__(self) -> None:
        self.stack: list[_Value] = []
        self.memo: dict[int, _Value] = {}
        self.work = 0
        self.depth = 0

    def spend(self, amount: int) -> None:
        self.work += amount
        if self.work > MAX_HASH_WORK:
            raise UnsafePickleError(
                f"pickle needs more than {MAX_HASH_WORK} hashing steps (shared references)"
            )

    def pop(self, count: int) -> list[_Value]:
        start = len(self.stack) - count
        if start < 0 or any(v is _MARK for v in self.stack[start:]):
            raise CheckpointFormatError("malformed pickle: stack underflow")
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def pop_mark(self) -> list[_Value]:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1 :]
                del self.stack[i:]
                self.depth -= 1
                return items
        raise CheckpointFormatError("malformed pickle: MARK missing")

    def top(self) -> _Value:
        if not self.stack or self.stack[-1] is _MARK:
            raise CheckpointFormatError("malformed pickle: stack underflow")
        return self.stack[-1]

    def add(self, target: _Value, items: list[_Value], stride: int, hashed: bool) -> None:
        """``items`` (or key, value pairs) go into the list, dict or set ``target``."""
        cost = sum(v.weight for v in items[::stride])
        if hashed:
            self.spend(cost)
        if target is not _LEAF and target.children is None:
            target.elems = min(target.elems + cost, _CAP)

    def call(self, args: list[_Value]) -> _Value:
        """The result of calling with ``args`` (the values popped besides the callable)."""
        # A call may hash what its arguments hold (set(list), OrderedDict(pairs)); BUILD
        # re-inserts the keys of a state dict.
        self.spend(sum([a.elems + sum([c.elems for c in a.children or ()]) for a in args]))
        return _Value(depth=max([a.depth for a in args]) if args else 0)

    def step(self, kind: int, name: str, arg: Any) -> None:
        """The stack effect of one opcode (PROTO, FRAME and leaf pushes are done by the caller)."""
        stack = self.stack
        if kind == _GET:
            value = self.memo.get(int(arg))
            if value is None:
                raise CheckpointFormatError(f"pickle reads memo slot {arg} that was never set")
            stack.append(value)
        elif kind == _MEMOIZE:
            self.memo[len(self.memo)] = self.top()
        elif kind == _NEW_CONTAINER:
            stack.append(_Value())
        elif kind == _MARK_OP:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise UnsafePickleError(f"pickle nests deeper than {MAX_DEPTH} levels")
            stack.append(_MARK)
        elif kind in (_TUPLE_N, _TUPLE_MARK):
            items = self.pop_mark() if kind == _TUPLE_MARK else self.pop(_TUPLE_SIZES[name])
            weight = min(1 + sum([i.weight for i in items]), _CAP)
            depth = 1 + max([i.depth for i in items]) if items else 1
            if depth > MAX_DEPTH:
                raise UnsafePickleError(f"pickle nests tuples deeper than {MAX_DEPTH} levels")
            stack.append(_Value(weight, weight - 1, items, depth))
        elif kind in (_APPEND, _SETITEM):
            items = self.pop(1 if kind == _APPEND else 2)
            self.add(self.top(), items, len(items), kind == _SETITEM)
        elif kind in (_APPENDS, _SETITEMS, _ADDITEMS):
            items = self.pop_mark()
            self.add(self.top(), items, 2 if kind == _SETITEMS else 1, kind != _APPENDS)
        elif kind in (_LIST, _DICT, _FROZENSET):
            container = _Value()
            self.add(container, self.pop_mark(), 2 if kind == _DICT else 1, kind != _LIST)
            stack.append(container)
        elif kind == _BUILD:
            self.call(self.pop(1))
            self.top()
        elif kind in (_CALL2, _NEWOBJ_EX):
            stack.append(self.call(self.pop(3 if kind == _NEWOBJ_EX else 2)[1:]))
        elif kind == _CALL_MARK:
            stack.append(self.call(self.pop_mark()))
        elif kind == _POP:
            if stack and stack[-1] is _MARK:
                self.pop_mark()  # POP drops a MARK as well (Lib/pickle.py load_pop)
            else:
                self.pop(1)
        elif kind == _POP_MARK:
            self.pop_mark()
        elif kind == _DUP:
            stack.append(self.top())
        elif kind in (_POP1_PUSH, _POP2_PUSH):
            self.pop(1 if kind == _POP1_PUSH else 2)
            stack.append(_LEAF)


def prescan(data: bytes) -> Opcodes | None:
    """Refuse what could exhaust memory or time when unpickled, executing nothing.

    :func:`~exporter.torchfile.opscan.accepted_opcodes` accepts regular pickles in whole-array
    operations; when it cannot, :func:`walk` decides, and every refusal comes from there. A
    pickle that differs from one accepted lately only in the values of numbers is accepted
    as that one was (:class:`_Accepted`).

    Returns:
        The pickle's opcodes where the fast path parsed them (for it, or for the pickle it
        was accepted as); None where the walker decided.
    """
    limits = (MAX_OPCODES, MAX_DEPTH, MAX_HASH_WORK)
    covered = ACCEPTED.covering(data, limits)
    if covered is not None:
        return covered
    ops = accepted_opcodes(data, *limits)
    if ops is None:
        walk(data)
    else:
        ACCEPTED.add(data, ops, limits)
    return ops


class _Accepted:
    """The last :data:`KEEP` pickles of :data:`REMEMBER_FROM` bytes or more that the fast path
    accepted, each with a mask of its bytes that hold the value of a fixed-width number, and
    the limits it was accepted under.

    A pickle of the same length whose bytes differ from one of them only where the mask is set
    is the same opcodes with other numbers: every opcode and memo index, every length and
    string is the same, and numbers of fixed width (``BININT``, ``BININT1``, ``BININT2``,
    ``BINFLOAT``) can take any value. What the walker checks (opcodes, memo indices, stack
    effects, hashing work, nesting, that strings decode) does not change, so neither does its
    verdict. (Memo indices, lengths, ``FRAME`` and ``LONG1`` are not in the mask.) One
    comparison costs a millisecond where a scan of a 36,000-tensor partition file's pickle
    costs 0.15 s. Shared by the threads of the process, and inherited by a forked reader.
    """

    KEEP = 2
    REMEMBER_FROM = 1 << 16
    #: Opcodes whose argument is a number of fixed width, and that width.
    NUMBERS = {"BININT": 4, "BININT1": 1, "BININT2": 2, "BINFLOAT": 8}

    def __init__(self) -> None:
        # Replaced whole, never changed in place: threads read it without a lock.
        self.entries: tuple[tuple[np.ndarray, np.ndarray, tuple[int, ...], Opcodes], ...] = ()

    def covers(self, data: bytes, limits: tuple[int, ...]) -> bool:
        """Whether ``data`` differs from a pickle remembered under the same ``limits`` only in
        numbers' values."""
        return self.covering(data, limits) is not None

    def covering(self, data: bytes, limits: tuple[int, ...]) -> Opcodes | None:
        """The opcodes of ``data`` (those of the remembered pickle it differs from only in
        numbers' values, at the same places), or None if it differs from each in more."""
        if len(data) < self.REMEMBER_FROM:
            return None
        new = np.frombuffer(data, dtype=np.uint8)
        for old, numbers, accepted_under, ops in self.entries:
            if (len(old) == len(new) and accepted_under == limits
                    and numbers[np.flatnonzero(old != new)].all()):
                return ops
        return None

    def add(self, data: bytes, ops: Opcodes, limits: tuple[int, ...]) -> None:
        """Remember ``data``, which the fast path parsed into ``ops`` and accepted under
        ``limits``."""
        if len(data) < self.REMEMBER_FROM:
            return
        numbers = np.zeros(len(data), dtype=np.bool_)
        for name, width in self.NUMBERS.items():
            at = ops.starts[ops.codes == CODE[name]]
            for byte in range(1, width + 1):
                numbers[at + byte] = True
        entry = (np.frombuffer(data, dtype=np.uint8), numbers, limits, ops)
        self.entries = (entry, *self.entries)[: self.KEEP]

    def clear(self) -> None:
        self.entries = ()


ACCEPTED = _Accepted()


def walk(data: bytes) -> None:
    """Walk the opcode stream without executing it; refuse what could exhaust memory or time."""
    scan = _Prescan()
    kinds = _KINDS
    stack = scan.stack
    try:
        for ops, (opcode, arg, _) in enumerate(pickletools.genops(data), 1):
            if ops > MAX_OPCODES:
                raise UnsafePickleError(f"pickle has more than {MAX_OPCODES} opcodes")
            kind = kinds.get(opcode.name, _PUSH_LEAF)
            if kind == _PUSH_LEAF:  # the most frequent kinds first, inline
                stack.append(_LEAF)
            elif kind == _PUT:
                if not 0 <= arg <= ops:
                    raise UnsafePickleError(f"pickle memo index {arg} out of range")
                scan.memo[arg] = scan.top()
            elif kind == _STOP:
                return
            else:
                scan.step(kind, opcode.name, arg)
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"malformed pickle: {exc}") from exc
    raise CheckpointFormatError("malformed pickle: no STOP opcode")
