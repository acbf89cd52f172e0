"""The member table of a torch zip whose central directory is the last one's but for its
name and its members' checksums: taken from that one, not parsed again.

The data-parallel partition files of one ZeRO checkpoint are written alike: the same members
in the same order, at the same places, of the same sizes; their central directories differ
only in each member's CRC-32 and in the file's own name, which ``torch.save`` puts before
every member's (``zero_pp_rank_3_mp_rank_00_optim_states/data/17``). Parsing a directory of
36,000 members costs 0.03-0.05 s (decoding the names, checking them, indexing them); comparing
one with the last is a few milliseconds of numpy. So the fast reader's last large table is
kept (:func:`remember`), and a file whose directory differs from it only at checksum bytes
and at the first bytes of each name, where it holds one prefix of the same length, takes it
(:func:`alike`): its names are the kept ones with the prefix swapped, and they pass the same
checks when the new prefix does (one ``/``, at its end; nothing the name checks refuse).
Each file's local headers are still read, so its members' data offsets and outcomes are its
own.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from exporter.torchfile.zipdir import Directory, locate_central_directory

#: Directories of fewer members are parsed again: comparing would save little.
REMEMBER_FROM = 4096
#: Where the CRC-32 and the name lie in a central directory header (APPNOTE 4.3.12).
_CRC, _NAME = 16, 46


@dataclass(frozen=True)
class Known:
    """A parsed directory and what its file derived of it: the directory's bytes with every
    CRC-32 zeroed (``masked``; ``crc`` marks those bytes), where each header starts, the
    file's size, the names' prefix, the member table (names emptied), the names by row and
    NUL-joined."""

    masked: np.ndarray
    crc: np.ndarray
    starts: np.ndarray
    file_size: int
    prefix: str
    directory: Directory
    index: dict[str, int]
    joined: str


_lock = threading.Lock()
_known: Known | None = None


def remember(directory: Directory, file_size: int, prefix: str, index: dict[str, int],
             joined: str) -> None:
    """Keep a table the fast reader parsed (and its file checked) for the next file: one of
    many members, every name of which starts with ``prefix``."""
    global _known
    if directory.raw is None or len(index) < REMEMBER_FROM:
        return
    if not (joined.startswith(prefix) and joined.count("\x00" + prefix) == len(index) - 1):
        return
    raw, starts = directory.raw
    crc = np.zeros(len(raw), np.bool_)
    for k in range(4):
        crc[starts + _CRC + k] = True
    masked = np.where(crc, np.uint8(0), np.frombuffer(raw, np.uint8))
    kept = Known(masked, crc, starts, file_size, prefix, replace(directory, names=[], raw=None),
                 index, joined)
    with _lock:
        _known = kept


def forget() -> None:
    global _known
    with _lock:
        _known = None


def alike(path: Path, file_size: int) -> tuple[Known, str] | None:
    """The kept table and the prefix of the file at ``path``, if its central directory differs
    from the kept one only in CRC-32s and in the first bytes of each name, where it holds one
    prefix that the name checks accept; else None. Never raises.

    The headers are where the kept ones are: every byte but those is compared (signatures,
    lengths and offsets included)."""
    known = _known
    if known is None or file_size != known.file_size:
        return None
    try:
        with open(path, "rb", buffering=0) as fh:
            located = locate_central_directory(fh.fileno(), file_size)
            if located is None or located[1] != len(known.masked):
                return None
            raw = os.pread(fh.fileno(), located[1], located[0])
    except OSError:
        return None
    if len(raw) != len(known.masked):
        return None
    new = np.frombuffer(raw, np.uint8)
    width = len(known.prefix)
    name = int(known.starts[0]) + _NAME
    try:
        prefix = raw[name : name + width].decode("ascii")
    except UnicodeDecodeError:
        return None
    if not _safe_prefix(prefix, known.prefix):
        return None
    # The bytes where this prefix differs from the kept one must hold it in every name; then
    # they are set back to the kept prefix's, and the rest compared, checksums aside.
    wanted = np.frombuffer(prefix.encode("ascii"), np.uint8)
    kept = np.frombuffer(known.prefix.encode("ascii"), np.uint8)
    changed = np.flatnonzero(wanted != kept)
    at = (known.starts[:, None] + (_NAME + changed)).ravel()
    if not (new[at].reshape(len(known.starts), len(changed)) == wanted[changed]).all():
        return None
    masked = np.where(known.crc, np.uint8(0), new)
    masked[at] = np.tile(kept[changed], len(known.starts))
    return (known, prefix) if np.array_equal(masked, known.masked) else None


def _safe_prefix(prefix: str, kept: str) -> bool:
    """Whether names with ``prefix`` before them pass the checks the kept ones passed with
    ``kept``: one ``/``, at the end of both; no NUL, backslash, ``..`` or drive; printable."""
    name = prefix[:-1]
    return (len(prefix) == len(kept) and prefix.endswith("/") and "/" not in name
            and "\\" not in name and "\x00" not in name and name not in ("", ".", "..")
            and ":" not in name and name.isprintable())
