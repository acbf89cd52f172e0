"""Where each opcode of a pickle starts, found with numpy instead of a Python loop per opcode.

Part of the prescan's fast path (:mod:`exporter.torchfile.opscan`). For every byte ``i``,
:func:`_next_positions` computes where the opcode that *would* start at ``i`` ends, reading
arguments as :func:`pickletools.genops` does: fixed sizes and little-endian length prefixes
as its ``ArgumentDescriptor.n`` says (Lib/pickletools.py), two newline-terminated lines for
GLOBAL. The real opcodes are the chain ``0 -> nxt[0] -> ...`` up to the first STOP.

Following that chain one opcode at a time would be a Python loop per opcode again, and
pointer doubling costs a gather over every byte per doubling (twenty of them for a million
opcodes). Instead :func:`_lockstep` starts one chain at every 512th byte of a window and
advances them all together until each has left its chunk: a chain started inside an argument
reads garbage for a few opcodes, then lands on a real opcode start and from there on *is*
the real chain (chains that share a position share everything after it). :func:`_real_chain`
then follows the real chain from chunk to chunk, checking that it meets each chunk's chain,
and walks one opcode at a time through the rare chunk whose chain it never meets. Windows of
a megabyte start where the real chain left the previous one, so that a long argument is
skipped rather than read as garbage.

An opcode this module does not model, an argument genops could not read (past the end, a
negative length) or decode (:func:`_arguments_decode`), no STOP, or opcodes so sparse that
the exact walker is faster: :func:`opcode_starts` returns None and the caller declines, so
that the walker decides, with its own message.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass

import numpy as np

#: Opcodes the fast path models (every binary opcode of protocols 2 to 5 that CPython's
#: pickler writes, except POP, POP_MARK and DUP, whose effect depends on what is on the stack).
#: Text-mode opcodes of protocol 0 (INT, PUT, GET, ...) are left to the exact walker, as are
#: PERSID, INST, EXT1/2/4 and NEXT_BUFFER; GLOBAL is modelled because protocol 2 uses it.
SUPPORTED = frozenset({
    "PROTO", "FRAME", "STOP", "MARK",
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT",
    "SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "GLOBAL", "STACK_GLOBAL",
    "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "EMPTY_LIST", "LIST", "APPEND",
    "APPENDS", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET",
    "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
    "REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "BUILD", "BINPERSID", "READONLY_BUFFER",
})
#: Strings that genops decodes as UTF-8 (``read_unicodestring1/4/8``, errors="surrogatepass").
UTF8 = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})

CODE: dict[str, int] = {op.name: ord(op.code) for op in pickletools.opcodes}
_PREFIX = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
           pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}
_SIGNED = pickletools.TAKEN_FROM_ARGUMENT4  # read_string4 / read_long4 refuse n < 0
_NEWLINE, _BACKSLASH = 0x0A, 0x5C
#: Bytes per chain in the lock-step walk: more chains, fewer steps of the Python loop.
_CHUNK = 512
#: Bytes per window: the chains of one window are followed together.
_WINDOW = 1 << 20
#: Past four windows, decline if the real chain has fewer opcodes than one per this many
#: bytes: long arguments are garbage to the chains, and the walker (a microsecond an opcode)
#: is then faster.
_SPARSE = 32
#: The longest fixed-size opcode (FRAME, BINFLOAT: one byte and eight).
_LONGEST_FIXED = 9


def _tables() -> tuple[np.ndarray, np.ndarray, dict[int, tuple[int, bool]]]:
    """Each opcode byte's size if fixed (0 if length-prefixed or GLOBAL, 1 if unsupported),
    whether it is unsupported, and for length-prefixed ones the prefix width and sign."""
    step = np.ones(256, np.int32)
    unsupported = np.ones(256, np.bool_)
    prefixed: dict[int, tuple[int, bool]] = {}
    for op in pickletools.opcodes:
        if op.name not in SUPPORTED:
            continue
        unsupported[ord(op.code)] = False
        n = 0 if op.arg is None else op.arg.n
        if op.name == "GLOBAL":  # two lines (read_stringnl_noescape_pair)
            step[ord(op.code)] = 0
        elif n >= 0:
            step[ord(op.code)] = 1 + n
        else:
            step[ord(op.code)] = 0
            prefixed[ord(op.code)] = (_PREFIX[n], n == _SIGNED)
    return step, unsupported, prefixed


_STEP, UNSUPPORTED, _PREFIXED = _tables()
#: Where the text of a string argument starts, after its opcode: 1 + the length prefix for
#: the UTF-8 strings (2 at least), 1 for GLOBAL (its two lines); 0 for other opcodes.
_TEXT = np.zeros(256, np.int8)
_TEXT[[CODE[name] for name in UTF8]] = [1 + _PREFIXED[CODE[name]][0] for name in UTF8]
_GLOBAL_TEXT = 1
_TEXT[CODE["GLOBAL"]] = _GLOBAL_TEXT


def _unaligned(padded: np.ndarray, dtype: str, length: int) -> np.ndarray:
    """``view[i]``: the little-endian ``dtype`` value stored at byte ``i + 1``, for every i."""
    return np.ndarray((length,), dtype, padded, offset=1, strides=(1,))


def _next_positions(data: _Data, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """For the window ``[lo, hi)`` of the data, counted from ``lo``: ``nxt[i]``, where the
    opcode starting at byte ``i`` ends, and the bytes whose argument genops could not read
    (past the end of the data, a negative length).

    There, and at unsupported opcodes and STOP, ``nxt[i] = i + 1``: chains started inside an
    argument then never stop short, and soon land on a real opcode (the caller checks the
    real chain for unsupported opcodes and unreadable arguments). ``nxt`` has one more entry,
    the end of the window, pointing at itself.
    """
    size, beyond = hi - lo, len(data.buf) - lo  # the window, and what is left of the data
    nxt = np.empty(size + 1, np.int32)
    body = nxt[:size]
    np.take(_STEP, data.buf[lo:hi], out=body, mode="clip")  # "raise" would buffer the output
    nxt[size] = size
    varying = np.flatnonzero(body == 0)
    body += np.arange(size, dtype=np.int32)
    ends = _argument_ends(data, varying + lo) - lo
    unfit = ends > beyond
    body[varying] = np.where(unfit, varying + 1, ends)
    tail = np.arange(max(0, beyond - _LONGEST_FIXED), size)
    tail = tail[body[tail] > beyond]  # fixed-size arguments cut off by the end of the data
    body[tail] = tail + 1
    return nxt, np.concatenate([varying[unfit], tail])


def _argument_ends(data: _Data, at: np.ndarray) -> np.ndarray:
    """Where the length-prefixed and GLOBAL opcodes at ``at`` end (past the end of the data if
    their argument does not fit or its length is negative)."""
    size = len(data.buf)
    codes = data.buf[at]
    ends = np.full(len(at), size + 1, np.int64)
    for code, (width, signed) in _PREFIXED.items():
        here = codes == code
        where = at[here]
        if width == 1:
            length = data.padded[where + 1].astype(np.int64)
        else:
            dtype = {4: "<i4" if signed else "<u4", 8: "<u8"}[width]
            raw = _unaligned(data.padded, dtype, size)[where]
            length = np.minimum(raw, size).astype(np.int64)  # u8 lengths past 2**63 included
            if signed:
                length[raw < 0] = size  # genops: "string4 byte count < 0"
        ends[here] = where + 1 + width + length
    glob = codes == CODE["GLOBAL"]
    second = np.searchsorted(data.newlines, at[glob] + 1) + 1
    ends[glob] = np.append(data.newlines, size)[np.minimum(second, len(data.newlines))] + 1
    return ends


def _column_search(rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each query, how many entries of column ``cols[q]`` are below ``values[q]``
    (columns are sorted); a binary search done for all queries at once."""
    lo = np.zeros(len(cols), np.int64)
    hi = np.full(len(cols), len(rows), np.int64)
    while (active := lo < hi).any():
        mid = (lo + hi) >> 1
        below = rows[np.minimum(mid, len(rows) - 1), cols] < values
        lo = np.where(active & below, mid + 1, lo)
        hi = np.where(active & ~below, mid, hi)
    return lo


def _lockstep(nxt: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Follow one chain per chunk, all at once, until each has left its chunk.

    Returns the positions visited (steps x chunks; each column increases) and how many of
    each column lie in its own chunk.
    """
    starts = np.arange(0, size, _CHUNK, dtype=np.int32)
    ends = np.minimum(starts + _CHUNK, size)
    rows = np.empty((_CHUNK + 9, len(starts)), np.int32)  # a step advances a byte at least
    rows[0] = starts
    step = 0
    while True:
        for _ in range(8):
            np.take(nxt, rows[step], out=rows[step + 1], mode="clip")
            step += 1
        if (rows[step] >= ends).all():
            break
    rows = rows[: step + 1]
    return rows, _column_search(rows, np.arange(len(starts)), ends)


@dataclass(frozen=True)
class Opcodes:
    """The opcodes of a pickle up to its first STOP.

    ``starts``: each opcode's offset; ``codes``: its byte; ``padded``: the data with eight zero
    bytes after it; ``present``: which of the 256 opcode bytes occur.
    """

    starts: np.ndarray
    codes: np.ndarray
    padded: np.ndarray
    present: np.ndarray

    def uint4(self, at: np.ndarray) -> np.ndarray:
        """The four bytes after the opcodes at ``at``, as a little-endian unsigned integer
        (the low byte alone is a one-byte argument)."""
        words = _unaligned(self.padded, "<u4", len(self.padded) - 8)
        return words[self.starts[at]].astype(np.int64)


@dataclass(frozen=True)
class _Data:
    """The pickle as bytes, the same with eight zero bytes after it (so that arguments read
    past the end stay inside it), and where its newlines are."""

    buf: np.ndarray
    padded: np.ndarray
    newlines: np.ndarray


def opcode_starts(data: bytes, max_opcodes: int) -> Opcodes | None:
    """The opcodes :func:`pickletools.genops` would yield, or None if the fast path cannot say
    (an opcode it does not model, an argument that does not fit or decode, no STOP), if there
    are more than ``max_opcodes``, or if they are so sparse that the walker is faster."""
    buf = np.frombuffer(data, np.uint8)
    whole = _Data(buf, np.concatenate([buf, np.zeros(8, np.uint8)]),
                  np.flatnonzero(buf == _NEWLINE))
    found: list[np.ndarray] = []
    unreadable: list[np.ndarray] = []
    at, covered, count = 0, 0, 0
    while at < len(buf):  # one window after the other, from where the real chain left off
        lo, hi = at, min(len(buf), at + _WINDOW)
        starts, bad, at = _window(whole, lo, hi)
        found.append(starts)
        unreadable.append(bad)
        covered, count = covered + hi - lo, count + len(starts)
        if (buf[starts] == CODE["STOP"]).any():
            break
        if count > max_opcodes or (covered >= 4 * _WINDOW and count * _SPARSE < covered):
            return None
    starts = np.concatenate(found)
    codes = buf[starts]
    stop = int(np.argmax(codes == CODE["STOP"]))
    if codes[stop] != CODE["STOP"]:
        return None
    starts, codes = starts[: stop + 1], codes[: stop + 1]
    present = np.bincount(codes, minlength=256) > 0
    if (present & UNSUPPORTED).any() or _any_in(np.concatenate(unreadable), starts):
        return None
    ops = Opcodes(starts, codes, whole.padded, present)
    return ops if _arguments_decode(whole, ops) else None


def _window(data: _Data, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The real chain's opcodes in ``[lo, hi)`` (``lo`` is one of them), the unreadable
    arguments there, and where the real chain leaves the window."""
    nxt, unreadable = _next_positions(data, lo, hi)
    rows, inside = _lockstep(nxt, hi - lo)
    entry, walked, leaves = _real_chain(nxt, rows, inside)
    step = np.arange(len(rows))[:, None]
    taken = (step >= entry) & (step < inside)
    starts = rows.T[taken.T].astype(np.int64)  # chunk by chunk: in increasing order
    if walked:
        starts = np.insert(starts, np.searchsorted(starts, walked), walked)
    return starts + lo, unreadable + lo, leaves + lo


def _any_in(values: np.ndarray, sorted_array: np.ndarray) -> bool:
    found = np.minimum(np.searchsorted(sorted_array, values), len(sorted_array) - 1)
    return bool((sorted_array[found] == values).any())


def _real_chain(nxt: np.ndarray, rows: np.ndarray, inside: np.ndarray) -> tuple[
        np.ndarray, list[int], int]:
    """Where the real chain (from the window's first byte) joins each chunk's chain: a step
    per chunk (past the last step for chunks it skips or never meets); the positions walked
    one by one in chunks whose own chain it does not meet; where it leaves the window."""
    size = len(nxt) - 1
    chunks = rows.shape[1]
    exits = rows[inside, np.arange(chunks)].astype(np.int64)
    lands = np.minimum(exits // _CHUNK, chunks - 1)
    at_step = _column_search(rows, lands, exits)
    met = (exits < size) & (at_step < inside[lands])
    met &= rows[np.minimum(at_step, len(rows) - 1), lands] == exits
    joins = np.where(met, at_step, -1).tolist()
    exit_of = exits.tolist()
    entry = np.full(chunks, len(rows), np.int64)
    walked: list[int] = []
    at, joined = 0, 0  # byte 0 is step 0 of chunk 0's chain
    while at < size:  # one turn per chunk the real chain enters
        chunk = at // _CHUNK
        if joined >= 0:
            entry[chunk] = joined
            at, joined = exit_of[chunk], joins[chunk]
            continue
        end = min(size, (chunk + 1) * _CHUNK)
        while at < end:
            walked.append(at)
            at = int(nxt[at])
        if at < size:
            column = rows[: inside[at // _CHUNK], at // _CHUNK]
            found = int(np.searchsorted(column, at))
            joined = found if found < len(column) and column[found] == at else -1
    return entry, walked, at


def _arguments_decode(data: _Data, ops: Opcodes) -> bool:
    """Whether genops decodes every string argument: UTF-8 (surrogates allowed) for the
    unicode opcodes, ASCII without backslash escapes for GLOBAL's lines
    (``read_stringnl_noescape``: ``codecs.escape_decode(line)[0].decode("ascii")``)."""
    if not (ops.present & (_TEXT > 0)).any():
        return True
    text = np.flatnonzero(_TEXT[ops.codes])
    width = _TEXT[ops.codes[text]]
    lo = ops.starts[text] + width  # GLOBAL: both lines, newlines included
    hi = ops.starts[text + 1]  # where the next opcode starts (STOP is last, not text)
    high = data.buf >= 0x80
    glob = width == _GLOBAL_TEXT
    if ops.present[CODE["GLOBAL"]] and _any_between(high | (data.buf == _BACKSLASH),
                                                    lo[glob], hi[glob]).any():
        return False
    odd = _any_between(high, lo, hi)
    for begin, end in zip(lo[odd].tolist(), hi[odd].tolist(), strict=True):
        try:  # the few strings that are not ASCII
            bytes(data.buf[begin:end]).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return False
    return True


def _any_between(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whether ``mask[lo[i]:hi[i]]`` holds a True, for ranges in order, apart, inside it."""
    if not len(lo):
        return np.zeros(0, np.bool_)
    bounds = np.empty(2 * len(lo), np.int64)
    bounds[0::2], bounds[1::2] = lo, hi
    return np.logical_or.reduceat(mask, bounds)[0::2] & (hi > lo)
