"""The torch zip checkpoint container: locate ``data.pkl`` and the storage members.

``torch.save`` (torch >= 1.6, ``_use_new_zipfile_serialization``) writes an *uncompressed*
zip: ``<prefix>/data.pkl``, one member ``<prefix>/data/<key>`` per storage (aligned to 64
bytes), ``<prefix>/version`` and ``<prefix>/byteorder`` (torch/serialization.py,
``_save``; caffe2/serialize/inline_container.cc, ``PyTorchStreamWriter``). Because members
are stored, a tensor's bytes sit at a fixed offset of the file and can be read with
``pread`` or mapped, without decompressing anything. We refuse compressed members: that
rules out zip bombs and keeps every byte range checkable against the file size.

The central directory is parsed by :mod:`exporter.torchfile.zipdir` (numpy, for the layout
torch writes) or by :mod:`zipfile` (anything else); nothing is extracted, so member names
never reach the file system. Names no torch writer produces (absolute, ``..``, backslashes)
and duplicated names are refused all the same.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from exporter.errors import CheckpointFormatError
from exporter.torchfile.likezip import alike, remember
from exporter.torchfile.zipdir import (
    BAD_HEADER,
    COMPRESSED,
    OK,
    PAST_END,
    TRUNCATED_HEADER,
    Directory,
    local_headers,
    read_fast,
    read_with_zipfile,
)

#: Why ``member`` refuses a member, by the outcome :func:`local_headers` gives it.
_REFUSALS = {
    COMPRESSED: "member '{}' is compressed; torch writes stored members",
    BAD_HEADER: "bad zip header of '{}'",
    TRUNCATED_HEADER: "truncated zip header of '{}'",
    PAST_END: "member '{}' runs past the end of the file (file truncated?)",
}
_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_.]{1,128}$")
#: Storage keys joined by NUL, when every one of them is valid (one search for all).
_ALL_KEYS = re.compile(r"(?:[A-Za-z0-9_.]{1,128}+(?:\x00[A-Za-z0-9_.]{1,128}+)*+)?")  # no backtracking

#: Largest ``data.pkl`` we read. Real ones hold no tensor data (a few MB at most).
MAX_PICKLE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Member:
    """A stored zip member: where its bytes are in the file."""

    name: str
    data_offset: int
    size: int


class TorchZip:
    """The members of one torch zip checkpoint.

    Args:
        path: the ``.pt`` file.

    Raises:
        CheckpointFormatError: not a torch zip checkpoint, or a member is compressed,
            out of bounds or missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.file_size = self.path.stat().st_size
        except OSError as exc:
            raise CheckpointFormatError(f"{self.path}: cannot read: {exc.strerror}") from exc
        if self.file_size == 0:
            raise CheckpointFormatError(f"{self.path}: empty file")
        self._spans: dict[str, tuple[int, int]] | None = None
        self._fd: int | None = None
        self._data_offset = array("q")
        self._sizes = array("q")
        self._status: bytes | None = None
        found = alike(self.path, self.file_size)
        if found is not None:  # the last large directory but for checksums and its name
            known, self.prefix = found
            self.fast_path = True
            self._index, self._joined, self._key_prefix = known.index, known.joined, known.prefix
            self._storage_prefix = self._key_prefix + "data/"
            self._directory: Directory | None = known.directory
            return
        directory = read_fast(self.path, self.file_size)
        if directory is None:
            try:
                if not zipfile.is_zipfile(self.path):
                    raise CheckpointFormatError(f"{self.path}: {_describe_non_zip(self.path)}")
                directory = read_with_zipfile(self.path, self.file_size)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError,
                    struct.error) as exc:
                raise CheckpointFormatError(
                    f"{self.path}: damaged zip container: {exc}") from exc
        #: True when the central directory was parsed by the numpy reader, False when
        #: :mod:`zipfile` read it (an archive with a comment, prepended bytes, other writers'
        #: extra fields, ...).
        self.fast_path = directory.fast
        # Name -> row of the arrays; no Python object per member beyond the name.
        self._index = dict(zip(directory.names, range(len(directory.names)), strict=True))
        if len(self._index) != len(directory.names):
            # Two members of one name: zip readers disagree on which one counts.
            raise CheckpointFormatError(f"{self.path}: zip container holds a member name twice")
        # No name holds a NUL (zipfile cuts names there, and the fast reader leaves such names
        # to it): joined by NUL, the names can be searched together at C speed.
        joined = "\x00".join(directory.names)
        _check_names(self.path, directory.names, joined)
        self.prefix = self._find_prefix(joined)
        # The prefix of the index's names: this file's, or the one of the file whose table
        # it took (exporter.torchfile.likezip), whose names are this file's but for it.
        self._key_prefix = self.prefix
        self._storage_prefix = self.prefix + "data/"
        self._joined = joined
        # Until the local headers are read; the names live on as the index's keys.
        self._directory = replace(directory, names=[], raw=None)
        remember(directory, self.file_size, self.prefix, self._index, joined)

    @contextmanager
    def open(self) -> Iterator[TorchZip]:
        """Keep the file open for the member look-ups inside the block: unpickling a ZeRO file
        of many small comm intervals looks up tens of thousands of storage members."""
        if self._fd is not None:
            yield self
            return
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            yield self
        finally:
            os.close(self._fd)
            self._fd = None

    def _pread(self, size: int, offset: int) -> bytes:
        if self._fd is not None:
            return os.pread(self._fd, size, offset)
        with open(self.path, "rb") as fh:
            return os.pread(fh.fileno(), size, offset)

    def _find_prefix(self, joined: str) -> str:
        """The ``<name>/`` of the one member named ``<name>/data.pkl`` with no other ``/``.

        Searched in the NUL-joined names (see :func:`_check_names`) rather than name by name.
        """
        prefixes = []
        text = joined + "\x00"
        at = text.find("/data.pkl\x00")
        while at >= 0:
            start = text.rfind("\x00", 0, at) + 1
            if "/" not in text[start:at]:
                prefixes.append(text[start : at + 1])
            at = text.find("/data.pkl\x00", at + 1)
        if len(prefixes) != 1:
            found = "none" if not prefixes else f"{len(prefixes)}"
            raise CheckpointFormatError(
                f"{self.path}: not a torch checkpoint (expected one '<name>/data.pkl', found {found})"
            )
        return prefixes[0]

    def _read_local_headers(self) -> None:
        """Data offsets and outcomes of every member, read together on the first look-up.

        Kept as ``array``/``bytes`` rather than numpy arrays: indexing them gives a Python
        ``int`` directly, several times faster than a numpy scalar, and ``storage_member``
        runs once per tensor.
        """
        directory = self._directory
        if directory is None:  # read meanwhile by another thread: _status is set
            return
        if self._fd is not None:
            data_offset, status = local_headers(self._fd, directory, self.file_size)
        else:
            with open(self.path, "rb", buffering=0) as fh:
                data_offset, status = local_headers(fh.fileno(), directory, self.file_size)
        self._data_offset = array("q", data_offset.tobytes())
        self._sizes = array("q", directory.size.tobytes())
        self._status = status.tobytes()  # last but one: the mark that the arrays are set
        self._directory = None

    def member(self, name: str) -> Member:
        """The stored member ``<prefix><name>``, with its data offset checked against the file."""
        return self._member(self._key_prefix + name)

    def storage_member(self, key: str) -> Member:
        """The member holding storage ``key`` (``<prefix>data/<key>``)."""
        if not isinstance(key, str) or not _STORAGE_KEY.match(key):
            raise CheckpointFormatError(f"{self.path}: invalid storage key {key!r}")
        return self._member(self._storage_prefix + key)

    def storage_span(self, key: str) -> tuple[int, int]:
        """``(data_offset, size)`` of storage ``key``'s member, as :meth:`storage_member`
        checks it, without the :class:`Member` (asked once per tensor while unpickling)."""
        if not isinstance(key, str) or not _STORAGE_KEY.match(key):
            raise CheckpointFormatError(f"{self.path}: invalid storage key {key!r}")
        row = self._row(self._storage_prefix + key)
        return self._data_offset[row], self._sizes[row]

    def storage_spans(self) -> dict[str, tuple[int, int]]:
        """``key -> (data_offset, size)`` of every storage member :meth:`storage_span` would
        accept (valid key, stored, in bounds), made once: unpickling looks up one per tensor,
        and a dict look-up is a fraction of :meth:`storage_span`'s checks. Keys it lacks are
        left to :meth:`storage_span`, which says why it refuses them."""
        if self._spans is None:
            if self._status is None:
                self._read_local_headers()
            prefix, cut = self._storage_prefix, len(self._storage_prefix)
            rows = {name[cut:]: row for name, row in self._index.items() if name.startswith(prefix)}
            if not _ALL_KEYS.fullmatch("\x00".join(rows)):  # names no torch writer makes
                rows = {key: row for key, row in rows.items() if _STORAGE_KEY.match(key)}
            status, offsets, sizes = self._status, self._data_offset, self._sizes
            assert status is not None
            self._spans = {key: (offsets[row], sizes[row]) for key, row in rows.items()
                           if status[row] == OK}
        return self._spans

    def layout(self) -> tuple[str, bytes, bytes, bytes]:
        """Every member's name (joined by NUL), data offset, size and outcome, in directory
        order: files of one layout hold every member at the same place, and pass or fail the
        same checks. Names are taken past the file's own ``<name>/`` prefix (torch names it
        after the file), as ``/<rest>``: no member name starts with ``/`` (refused), so no
        other name reads alike."""
        if self._status is None:
            self._read_local_headers()
        assert self._status is not None
        prefix, joined = self._key_prefix, self._joined
        if joined.startswith(prefix) and joined.count("\x00" + prefix) == len(self._index) - 1:
            # Every name has the prefix (a torch file's do): replaced in the joined names at
            # once (a name holds no NUL), not name by name (tens of thousands in a ZeRO file).
            names = "/" + joined[len(prefix) :].replace("\x00" + prefix, "\x00/")
        else:
            names = "\x00".join("/" + name[len(prefix) :] if name.startswith(prefix) else name
                                 for name in self._index)
        return names, self._data_offset.tobytes(), self._sizes.tobytes(), self._status

    def _member(self, filename: str) -> Member:
        row = self._row(filename)
        return Member(self._own_name(filename), self._data_offset[row], self._sizes[row])

    def _row(self, filename: str) -> int:
        # Called once per tensor while unpickling: one dict look-up, two array reads.
        row = self._index.get(filename)
        if row is None:
            raise CheckpointFormatError(f"{self.path}: missing member '{self._own_name(filename)}'")
        if self._status is None:
            self._read_local_headers()
            assert self._status is not None
        outcome = self._status[row]
        if outcome != OK:
            raise CheckpointFormatError(
                f"{self.path}: {_REFUSALS[outcome].format(self._own_name(filename))}")
        return row

    def _own_name(self, filename: str) -> str:
        """A name of the index as this file spells it (its own prefix)."""
        if self._key_prefix is self.prefix or not filename.startswith(self._key_prefix):
            return filename
        return self.prefix + filename[len(self._key_prefix) :]

    def read_member(self, name: str, limit: int) -> bytes:
        """The bytes of a small member (at most ``limit`` bytes)."""
        member = self.member(name)
        if member.size > limit:
            raise CheckpointFormatError(
                f"{self.path}: member '{member.name}' is {member.size} bytes, over the {limit} limit"
            )
        return self.read(member.data_offset, member.size)

    def has(self, name: str) -> bool:
        return (self._key_prefix + name) in self._index

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the file."""
        data = self._pread(size, offset)
        if len(data) != size:
            raise CheckpointFormatError(f"{self.path}: short read at {offset} (file truncated?)")
        return data

    def byteorder(self) -> str:
        """The ``byteorder`` record (absent in files from torch < 1.10, which were little-endian)."""
        if not self.has("byteorder"):
            return "little"
        return self.read_member("byteorder", 16).decode("ascii", "replace").strip()


def _check_names(path: Path, names: list[str], joined: str) -> None:
    """Refuse the first name :func:`_unsafe_name` refuses.

    The names are first searched together (``joined`` by NUL): without a ``\\``, a ``..``, a
    ``:/`` or a ``/`` at the start of a name, no name can be unsafe, and a file of 36,000
    members needs no call per name.
    """
    if not ("\\" in joined or ".." in joined or ":/" in joined or joined.startswith("/")
            or "\x00/" in joined):
        return
    for name in names:
        if _unsafe_name(name):
            raise CheckpointFormatError(
                f"{path}: zip member name {name[:100]!r} points outside the archive"
            )


def _unsafe_name(name: str) -> bool:
    """Absolute, drive-qualified, backslashed or ``..`` member names (never written by torch).

    Nothing is extracted, so such names could not reach the file system here; they are
    refused because no torch writer produces them and other tools might extract them.
    """
    drive = len(name) > 2 and name[0].isalpha() and name[1] == ":" and name[2] == "/"
    return name.startswith("/") or "\\" in name or ".." in name.split("/") or drive


def _describe_non_zip(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(512)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "a tar archive: the pre-1.0 torch format is not supported"
    # torch/serialization.py `_legacy_load`: the legacy format opens with a pickled magic
    # number (0x1950a86a20f9469cfc6c) written with protocol 2.
    if head[:3] == b"\x80\x02\x8a":
        return (
            "legacy (pre-1.6, non-zip) torch serialization format, not supported: "
            "re-save it with torch >= 1.6 (torch.save(torch.load(f), f))"
        )
    return "not a torch zip checkpoint"
