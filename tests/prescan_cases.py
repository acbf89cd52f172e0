"""Seeded random pickles for the prescan tests: real objects pickled by ``pickle`` and
``torch.save``, byte mutations of them, and opcode streams assembled at random.

Everything is drawn from a ``random.Random`` the caller seeds, so that a failing case can be
written again from its seed.
"""

from __future__ import annotations

import collections
import io
import pickle
import random
import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import torch


def data_pkl(obj: Any) -> bytes:
    """The pickle ``torch.save`` writes for ``obj`` (its ``data.pkl``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def _leaf(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, rng.randrange(-(10**6), 10**6), rng.random(), 10 ** rng.randrange(30),
        "k" * rng.randrange(6), "é" + "x" * rng.randrange(300), b"b" * rng.randrange(5), (),
        (rng.random(), rng.random()),
    ])


def random_object(rng: random.Random, depth: int = 0, pool: list[Any] | None = None) -> Any:
    """Nested containers of leaves and small tensors; some values appear more than once."""
    pool = [] if pool is None else pool
    if depth > 3 or rng.random() < 0.3:
        value = rng.choice(pool) if pool and rng.random() < 0.2 else _leaf(rng)
    else:
        size = rng.randrange(6) if depth or rng.random() < 0.9 else rng.randrange(1500)
        kind = rng.randrange(8)
        if kind == 0:
            value = [random_object(rng, depth + 1, pool) for _ in range(size)]
        elif kind == 1:
            value = tuple(random_object(rng, depth + 1, pool) for _ in range(size))
        elif kind == 2:
            value = {_hashable(rng): random_object(rng, depth + 1, pool) for _ in range(size)}
        elif kind == 3:
            value = {_hashable(rng) for _ in range(size)}
        elif kind == 4:
            value = frozenset(_hashable(rng) for _ in range(size))
        elif kind == 5:
            value = collections.OrderedDict(
                (str(i), random_object(rng, depth + 1, pool)) for i in range(size))
        elif kind == 6:
            value = torch.zeros(rng.randrange(1, 4))
        else:
            value = bytearray(rng.randbytes(rng.randrange(8)))
    if rng.random() < 0.3:
        pool.append(value)
    return value


def _hashable(rng: random.Random) -> Any:
    value = _leaf(rng)
    return value if not isinstance(value, bytearray) else bytes(value)


def pickles_of(rng: random.Random, obj: Any) -> Iterator[bytes]:
    """``obj`` pickled with protocols 2 to 5 and by ``torch.save``."""
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        yield pickle.dumps(obj, protocol=protocol)
    yield data_pkl(obj)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three edits: a byte changed (often to an opcode), removed, inserted or copied."""
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(out))
        edit = rng.randrange(5)
        if edit == 0:
            out[at] = rng.randrange(256)
        elif edit == 1:
            out[at] = rng.choice(b"()tldeusa]}N.\x85\x86\x87\x94\x8cRb\x81\x92Q\x93hjqr")
        elif edit == 2:
            del out[at]
        elif edit == 3:
            out.insert(at, rng.choice(b"()tldeusa]})N.\x85\x86\x87RbhjqrQ"))
        else:
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randrange(1, 8)]
    return bytes(out)


_LEAF_OPS = [b"N", b"\x88", b"\x89", b"K\x05", b"J\x01\x02\x03\x04", b"M\x01\x02",
             b"G" + bytes(8), b"X\x02\x00\x00\x00ab", b"\x8c\x01a", b"U\x01z", b"C\x01z",
             b"B\x00\x00\x00\x00", b"\x8a\x01\x05", b"cmod\nname\n", b")",
             b"T\x01\x00\x00\x00q", b"\x8b\x01\x00\x00\x00\x07"]


def random_stream(rng: random.Random) -> bytes:
    """Opcodes drawn so that the stack stays valid, in some streams now and then not: MARK
    frames, tuples, containers, calls, BUILD, memo writes and reads (PUT, MEMOIZE, or both)."""
    out = bytearray(b"\x80" + bytes([rng.choice([2, 3, 4, 5])]))
    memo = rng.choice(["put", "memoize", "mixed"])
    frames: list[list[str]] = [[]]
    slots: dict[int, str] = {}
    used, cheats = 0, rng.random() < 0.3  # a third of the streams break the stack now and then
    for _ in range(rng.randrange(1, 80)):
        frame, cheat, r = frames[-1], cheats and rng.random() < 0.03, rng.random()
        if r < 0.25 or (not frame and not cheat and r < 0.6):
            out += rng.choice(_LEAF_OPS)
            frame.append("leaf")
        elif r < 0.32:
            out += rng.choice([b"]", b"}", b"\x8f"])
            frame.append("container")
        elif r < 0.40:
            out += b"("
            frames.append([])
        elif r < 0.50 and (len(frames) > 1 or cheat):
            closer = rng.choice(b"tld\x91oeu\x90")
            out.append(closer)
            if len(frames) > 1:
                frames.pop()
            if closer in b"tld\x91o":
                frames[-1].append("call" if closer == ord("o") else "built")
        elif r < 0.60 and (frame or cheat):
            if memo == "put" or (memo == "mixed" and rng.random() < 0.5):
                index = used if rng.random() < 0.85 else rng.randrange(used + 3)
                out += (b"q" + bytes([index]) if index < 256 and rng.random() < 0.7
                        else b"r" + struct.pack("<I", index))
            else:
                index = used
                out += b"\x94"
            used = max(used, index + 1)
            slots[index] = frame[-1] if frame else "leaf"
        elif r < 0.70 and (slots or cheat):
            index = rng.choice(list(slots)) if slots else 0
            out += (b"h" + bytes([index]) if index < 256 and rng.random() < 0.7
                    else b"j" + struct.pack("<I", index))
            frame.append(slots.get(index, "leaf"))
        elif r < 0.78 and (len(frame) >= 2 or cheat):
            out += rng.choice([b"R", b"\x81"])
            frame[-2:] = ["call"]
        elif r < 0.82 and (len(frame) >= 3 or cheat):
            out += b"\x92"
            frame[-3:] = ["call"]
        elif r < 0.86 and (len(frame) >= 2 or cheat):
            out += rng.choice([b"a", b"b"])
            del frame[-1:]
        elif r < 0.89 and (len(frame) >= 3 or cheat):
            out += b"s"
            del frame[-2:]
        elif r < 0.95 and (frame or cheat):
            size = rng.randrange(1, 4 if cheat else min(3, len(frame)) + 1)
            out.append(0x84 + size)  # TUPLE1, TUPLE2, TUPLE3
            frame[-size:] = ["built"]
        elif r < 0.97 and (len(frame) >= 2 or cheat):
            out += b"\x93"
            frame[-2:] = ["leaf"]
        elif r < 0.99 and (frame or cheat):
            out += rng.choice([b"Q", b"\x98"])  # BINPERSID, READONLY_BUFFER
            frame[-1:] = ["leaf"]
        elif not cheats or rng.random() < 0.5:
            out += b"\x95" + struct.pack("<Q", 5)  # FRAME
        else:
            out += rng.choice([b"0", b"1", b"2"])  # POP, POP_MARK, DUP: left to the walker
    return bytes(out + rng.choice([b".", b".", b".", b"", b"N.", b".junk"]))
