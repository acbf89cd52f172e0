"""The torch zip checkpoint container: locate ``data.pkl`` and the storage members.

``torch.save`` (torch >= 1.6, ``_use_new_zipfile_serialization``) writes an *uncompressed*
zip: ``<prefix>/data.pkl``, one member ``<prefix>/data/<key>`` per storage (aligned to 64
bytes), ``<prefix>/version`` and ``<prefix>/byteorder`` (torch/serialization.py,
``_save``; caffe2/serialize/inline_container.cc, ``PyTorchStreamWriter``). Because members
are stored, a tensor's bytes sit at a fixed offset of the file and can be read with
``pread`` or mapped, without decompressing anything. We refuse compressed members: that
rules out zip bombs and keeps every byte range checkable against the file size.

We use :mod:`zipfile` only to parse the central directory; nothing is extracted, so member
names never reach the file system. Names no torch writer produces (absolute, ``..``,
backslashes) and duplicated names are refused all the same.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import CheckpointFormatError

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_HEADER_SIGNATURE = 0x04034B50
_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_.]{1,128}$")

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
        try:
            if not zipfile.is_zipfile(self.path):
                raise CheckpointFormatError(f"{self.path}: {_describe_non_zip(self.path)}")
            with zipfile.ZipFile(self.path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError,
                struct.error) as exc:
            raise CheckpointFormatError(f"{self.path}: damaged zip container: {exc}") from exc
        # Only what member() needs, as a tuple: a ZipInfo weighs about 500 bytes, and a ZeRO
        # file of many small comm intervals has a member per tensor (36,000 and more).
        self._infos: dict[str, tuple[int, int, int]] = {
            info.filename: (info.compress_type, info.header_offset, info.file_size)
            for info in infos
        }
        if len(self._infos) != len(infos):
            # Two members of one name: zip readers disagree on which one counts.
            raise CheckpointFormatError(f"{self.path}: zip container holds a member name twice")
        for name in self._infos:
            if _unsafe_name(name):
                raise CheckpointFormatError(
                    f"{self.path}: zip member name {name[:100]!r} points outside the archive"
                )
        self.prefix = self._find_prefix()
        self._members: dict[str, Member] = {}
        self._fd: int | None = None

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

    def _find_prefix(self) -> str:
        prefixes = [
            name[: -len("data.pkl")]
            for name in self._infos
            if name.endswith("/data.pkl") and name.count("/") == 1
        ]
        if len(prefixes) != 1:
            found = "none" if not prefixes else f"{len(prefixes)}"
            raise CheckpointFormatError(
                f"{self.path}: not a torch checkpoint (expected one '<name>/data.pkl', found {found})"
            )
        return prefixes[0]

    def member(self, name: str) -> Member:
        """The stored member ``<prefix><name>``, with its data offset checked against the file."""
        if name in self._members:
            return self._members[name]
        filename = self.prefix + name
        info = self._infos.get(filename)
        if info is None:
            raise CheckpointFormatError(f"{self.path}: missing member '{filename}'")
        compress_type, header_offset, file_size = info
        if compress_type != zipfile.ZIP_STORED:
            raise CheckpointFormatError(
                f"{self.path}: member '{filename}' is compressed; torch writes stored members"
            )
        if not 0 <= header_offset < self.file_size:
            # zipfile shifts offsets by any bytes it finds before the first member.
            raise CheckpointFormatError(f"{self.path}: bad zip header of '{filename}'")
        header = self._pread(_LOCAL_HEADER.size, header_offset)
        if len(header) != _LOCAL_HEADER.size:
            raise CheckpointFormatError(f"{self.path}: truncated zip header of '{filename}'")
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != _LOCAL_HEADER_SIGNATURE:
            raise CheckpointFormatError(f"{self.path}: bad zip header of '{filename}'")
        name_len, extra_len = fields[9], fields[10]
        data_offset = header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if data_offset + file_size > self.file_size:
            raise CheckpointFormatError(
                f"{self.path}: member '{filename}' runs past the end of the file "
                f"(file truncated?)"
            )
        member = Member(filename, data_offset, file_size)
        self._members[name] = member
        return member

    def storage_member(self, key: str) -> Member:
        """The member holding storage ``key`` (``<prefix>data/<key>``)."""
        if not isinstance(key, str) or not _STORAGE_KEY.match(key):
            raise CheckpointFormatError(f"{self.path}: invalid storage key {key!r}")
        return self.member(f"data/{key}")

    def read_member(self, name: str, limit: int) -> bytes:
        """The bytes of a small member (at most ``limit`` bytes)."""
        member = self.member(name)
        if member.size > limit:
            raise CheckpointFormatError(
                f"{self.path}: member '{member.name}' is {member.size} bytes, over the {limit} limit"
            )
        return self.read(member.data_offset, member.size)

    def has(self, name: str) -> bool:
        return (self.prefix + name) in self._infos

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
