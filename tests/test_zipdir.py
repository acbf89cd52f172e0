"""The numpy central directory reader gives the table zipfile gives, or declines.

Every torch file must take the fast path and agree, member for member, with the zipfile path
and with a reading of each local header on its own (what ``TorchZip.member`` did before).
Files the fast reader does not know (a comment, prepended bytes, a broken chain, other flags
or extra fields) must make it decline, so that they read, or fail, exactly as through
zipfile. Hostile files are refused on the fast path with the messages of the zipfile path.
"""

from __future__ import annotations

import errno
import mmap
import struct
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zip_builders import (
    central_header,
    members_of,
    patch,
    patch_central,
    rezip,
    torch_bytes,
    write_sparse_zip64,
)

from exporter.errors import CheckpointFormatError
from exporter.torchfile import container, load_torch_file, zipdir
from exporter.torchfile.container import TorchZip
from exporter.torchfile.zipdir import read_fast

SMALL = torch_bytes({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3).half(),
                     "nested": [torch.zeros(0), torch.tensor(7)]})
SMALL_MEMBERS = members_of(SMALL)
STORAGE = "archive/data/0"


def _outcome(path: Path, fast: bool = True) -> tuple:
    """What TorchZip makes of ``path``: the refusal, or the prefix, whether the fast reader
    ran, and each member's (data offset, size) or refusal."""
    forced = nullcontext() if fast else mock.patch.multiple(
        container, read_fast=lambda path, size: None, alike=lambda path, size: None)
    with forced:
        try:
            zip_ = TorchZip(path)
        except CheckpointFormatError as exc:
            return ("refused", str(exc))
    members = {}
    for name in zip_._index:  # every name, in central directory order
        if not name.startswith(zip_.prefix):
            members[name] = "outside the prefix"
            continue
        try:
            member = zip_.member(name[len(zip_.prefix) :])
            members[name] = (member.data_offset, member.size)
        except CheckpointFormatError as exc:
            members[name] = str(exc)
    return ("read", zip_.prefix, zip_.fast_path, members)


def _without_path(outcome: tuple) -> tuple:
    return outcome[:2] + outcome[3:] if outcome[0] == "read" else outcome


def _agree(path: Path, fast_path: bool) -> tuple:
    """Both paths give one outcome, without the flag of which path ran; the fast reader ran
    or declined as expected."""
    fast, slow = _outcome(path), _outcome(path, fast=False)
    assert (read_fast(path, path.stat().st_size) is not None) is fast_path
    if fast[0] == "read":
        assert (fast[2], slow[2]) == (fast_path, False)
    assert _without_path(fast) == _without_path(slow)
    return _without_path(fast)


def _one_by_one(path: Path) -> dict[str, tuple[int, int]]:
    """Each member's data offset from its own local header, as ``member`` read it before."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as fh:
        for info in z.infolist():
            fh.seek(info.header_offset)
            fields = struct.unpack("<IHHHHHIIIHH", fh.read(30))
            assert fields[0] == 0x04034B50
            out[info.filename] = (info.header_offset + 30 + fields[9] + fields[10],
                                  info.file_size)
    return out


def _write(tmp_path: Path, data: bytes, name: str = "x.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def seventy_thousand(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """70,000 storages: more than 65,535 members, so the end record holds 0xFFFF and only the
    ZIP64 end record has the count (APPNOTE 4.4.21-4.4.22)."""
    path = tmp_path_factory.mktemp("zipdir") / "many.pt"
    torch.save([torch.tensor([float(i)]) for i in range(70_000)], path)
    return path


@pytest.mark.parametrize("kind", ["small", "thousands", "seventy_thousand"])
def test_torch_files_take_the_fast_path_and_agree(tmp_path: Path, kind: str,
                                                  request: pytest.FixtureRequest) -> None:
    if kind == "seventy_thousand":
        path = request.getfixturevalue("seventy_thousand")
        tail = path.read_bytes()[-22:]
        assert struct.unpack_from("<HH", tail, 8) == (0xFFFF, 0xFFFF)
    elif kind == "thousands":
        path = tmp_path / "x.pt"
        torch.save({f"t{i}": torch.full((i % 7,), float(i)) for i in range(3000)}, path)
    else:
        path = _write(tmp_path, SMALL)
    _, _, members = _agree(path, fast_path=True)
    assert members == _one_by_one(path)
    assert len(members) > {"small": 4, "thousands": 3000, "seventy_thousand": 70_000}[kind]


def test_zipfile_zip64_local_headers_take_the_fast_path(tmp_path: Path) -> None:
    """Forced ZIP64 puts a ZIP64 extra field in every local header (not in the central
    directory): the data offsets must come from the local headers."""
    path = _write(tmp_path, rezip(SMALL_MEMBERS, force_zip64=True))
    _, _, members = _agree(path, fast_path=True)
    one_by_one = _one_by_one(path)
    assert members == one_by_one
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(STORAGE)
    assert one_by_one[STORAGE][0] == info.header_offset + 30 + len(STORAGE) + 20


def test_members_beyond_4_gib_are_read_from_zip64_fields(tmp_path: Path) -> None:
    """A sparse file of 4 GiB and more: a member of 4 GiB + 64 bytes, then members whose
    local headers start past 4 GiB, all sizes and offsets in ZIP64 extra fields."""
    saved = members_of(torch_bytes({"w": torch.arange(5.0)}))
    assert [n for n, _ in saved if n.startswith("archive/data/")] == [STORAGE]
    big = (4 << 30) + 64
    path = tmp_path / "big.pt"
    write_sparse_zip64(path, [saved[0], ("archive/data/9", big), *saved[1:]])
    assert path.stat().st_size > big
    _, _, members = _agree(path, fast_path=True)
    assert members == _one_by_one(path)
    assert members["archive/data/9"][1] == big
    assert members[STORAGE][0] > 1 << 32 and members[STORAGE][0] % 64 == 0
    assert torch.equal(load_torch_file(path).obj["w"].read(), torch.arange(5.0))


def _with_signature_in_a_name() -> bytes:
    return rezip([*SMALL_MEMBERS, ("archive/PK\x01\x02", b"x")])


def _with_nul_in_a_name() -> bytes:
    data = rezip([*SMALL_MEMBERS, ("archive/vXersion", b"3\n")])
    at = central_header(data, "archive/vXersion") + 46 + len("archive/v")
    return data[:at] + b"\x00" + data[at + 1 :]


def _cp437_name() -> bytes:
    data = rezip([*SMALL_MEMBERS, ("archive/\u00e9", b"x")])
    at = central_header(data, "archive/\u00e9")
    data = patch(data, at + 8, "<H", 0)  # no UTF-8 flag: zipfile decodes cp437
    return data


def _multi_disk_locator() -> bytes:
    return patch(SMALL, -22 - 20 + 16, "<I", 2)


def _short_zip64_field() -> bytes:
    """A ZIP64 extra field for an offset marked 0xFFFFFFFF, holding 4 bytes instead of 8."""
    data = rezip(SMALL_MEMBERS, extra=struct.pack("<HHI", 1, 4, 0))
    return patch_central(data, STORAGE, "offset", 0xFFFFFFFF)


# Files the fast reader must decline; zipfile reads them (True) or refuses them (False).
DECLINED = {
    "comment": (lambda: rezip(SMALL_MEMBERS, comment=b"a comment"), True),
    "prepended_bytes": (lambda: b"#!/bin/sh\n" * 10 + SMALL, True),
    "count_disagrees": (lambda: patch(SMALL, -22 + 10, "<H", 7), True),
    "zip64_count_disagrees": (lambda: patch(SMALL, -22 - 20 - 56 + 32, "<Q", 5), True),
    "entry_comment_breaks_chain": (
        lambda: patch_central(SMALL, "archive/data.pkl", "comment_len", 1), False),
    "name_length_breaks_chain": (
        lambda: patch_central(SMALL, "archive/byteorder", "name_len", 200), False),
    "signature_inside_a_name": (_with_signature_in_a_name, True),
    "nul_inside_a_name": (_with_nul_in_a_name, True),
    "cp437_name": (_cp437_name, True),
    "encrypted_flag": (lambda: patch_central(SMALL, STORAGE, "flags", 0x0809), True),
    "disk_number": (lambda: patch_central(SMALL, STORAGE, "disk", 1), True),
    "extract_version_too_high": (lambda: patch_central(SMALL, STORAGE, "needed", 64), False),
    "timestamp_extra_field": (
        lambda: rezip(SMALL_MEMBERS, extra=struct.pack("<HHBI", 0x5455, 5, 1, 0)), True),
    "zip64_field_too_short": (_short_zip64_field, False),
    "multi_disk_locator": (_multi_disk_locator, False),
    "end_record_not_last": (lambda: SMALL + b"\x00" * 7, True),
    "comment_length_without_comment": (lambda: patch(SMALL, -2, "<H", 5), True),
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_unusual_files_are_left_to_zipfile(tmp_path: Path, case: str) -> None:
    build, readable = DECLINED[case]
    path = _write(tmp_path, build())
    assert read_fast(path, path.stat().st_size) is None
    result = _agree(path, fast_path=False)
    assert (result[0] == "read") is readable, result


def test_prepended_bytes_shift_every_member(tmp_path: Path) -> None:
    path = _write(tmp_path, b"\x00" * 100 + SMALL)
    plain = _outcome(_write(tmp_path, SMALL, "plain.pt"))
    shifted = _outcome(path)
    assert shifted[2] is False and plain[2] is True
    assert shifted[3] == {name: (offset + 100, size) for name, (offset, size) in plain[3].items()}


# Hostile files the fast reader parses: refused as the zipfile path refuses them.
REFUSED = {
    "compressed_storage": (lambda: rezip(SMALL_MEMBERS, compress=STORAGE), "is compressed"),
    "size_past_the_end": (lambda: patch_central(SMALL, STORAGE, "size", 2**31),
                          "runs past the end of the file"),
    "offset_past_the_end": (lambda: patch_central(SMALL, STORAGE, "offset", 2**31),
                            "bad zip header of 'archive/data/0'"),
    "offset_in_the_last_bytes": (lambda: patch_central(SMALL, STORAGE, "offset", len(SMALL) - 9),
                                 "truncated zip header of 'archive/data/0'"),
    "local_signature": (lambda: _break_local_header(STORAGE), "bad zip header of"),
    "name_twice": (lambda: rezip([*SMALL_MEMBERS, SMALL_MEMBERS[1]]), "member name twice"),
    "climbing_name": (lambda: rezip([*SMALL_MEMBERS, ("archive/../../x", b"")]),
                      "'archive/../../x' points outside"),
    "absolute_name": (lambda: rezip([*SMALL_MEMBERS, ("/etc/x", b"")]), "points outside"),
    "backslash_name": (lambda: rezip([*SMALL_MEMBERS, ("archive\\x", b"")]), "points outside"),
    "drive_name": (lambda: rezip([*SMALL_MEMBERS, ("C:/x", b"")]), "'C:/x' points outside"),
    "no_data_pkl": (lambda: rezip([m for m in SMALL_MEMBERS if not m[0].endswith(".pkl")]),
                    "found none"),
    "two_prefixes": (lambda: rezip([*SMALL_MEMBERS, ("other/data.pkl", b"")]), "found 2"),
}


def _break_local_header(name: str) -> bytes:
    at = struct.unpack_from("<I", SMALL, central_header(SMALL, name) + 42)[0]
    return patch(SMALL, at, "<I", 0x04034B51)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hostile_files_are_refused_on_the_fast_path(tmp_path: Path, case: str) -> None:
    build, message = REFUSED[case]
    path = _write(tmp_path, build())
    result = _agree(path, fast_path=True)
    found = result[1] if result[0] == "refused" else result[2][STORAGE]
    assert message in str(found), result


def test_a_missing_storage_member_is_named(tmp_path: Path) -> None:
    zip_ = TorchZip(_write(tmp_path, SMALL))
    assert zip_.fast_path
    with pytest.raises(CheckpointFormatError, match="missing member 'archive/data/77'"):
        zip_.storage_member("77")
    with pytest.raises(CheckpointFormatError, match="invalid storage key"):
        zip_.storage_member("../0")
    assert zip_.storage_member("0") == zip_.member("data/0")


@pytest.mark.parametrize("name", ["archive/a..b", "archive/x:/y", "archive/data.pkl/x",
                                  "archive/..data", "archive/\u00e9t\u00e9"])
def test_names_that_only_look_unsafe_are_read(tmp_path: Path, name: str) -> None:
    """The names are searched together for ``..``, ``:/`` and the like; a hit that is no
    unsafe name (checked one by one) refuses nothing."""
    path = _write(tmp_path, rezip([*SMALL_MEMBERS, (name, b"x")]))
    result = _agree(path, fast_path=True)
    assert result[0] == "read" and result[1] == "archive/" and name in result[2]


def test_look_ups_read_nothing_once_the_headers_are_read(tmp_path: Path) -> None:
    """All local headers are read on the first look-up; the others are table look-ups."""
    path = tmp_path / "x.pt"
    torch.save([torch.full((3,), float(i)) for i in range(500)], path)
    zip_ = TorchZip(path)
    first = zip_.storage_member("0")

    def no_io(*args: object) -> None:
        raise AssertionError("read after the first look-up")

    with mock.patch("os.pread", no_io), mock.patch("os.preadv", no_io):
        members = [zip_.storage_member(str(i)) for i in range(500)]
    assert members[0] == first
    assert {m.data_offset for m in members} == {v[0] for n, v in _one_by_one(path).items()
                                                if n.startswith("x/data/")}


def test_a_file_cut_after_its_central_directory_was_read(tmp_path: Path) -> None:
    """Local headers are read on the first look-up: a file cut short since reads as cut."""
    path = _write(tmp_path, SMALL)
    zip_ = TorchZip(path)
    header = struct.unpack_from("<I", SMALL, central_header(SMALL, STORAGE) + 42)[0]
    path.write_bytes(SMALL[: header + 10])
    with pytest.raises(CheckpointFormatError, match="truncated zip header of 'archive/data/0'"):
        zip_.storage_member("0")


def _every_value_zip64(folder: Path) -> bytes:
    """SMALL's members with every size and offset in ZIP64 extra fields."""
    folder.mkdir(parents=True, exist_ok=True)
    write_sparse_zip64(folder / "zip64.pt", SMALL_MEMBERS, every_value=True)
    return (folder / "zip64.pt").read_bytes()


HOSTS = {"torch": lambda folder: SMALL, "zip64_fields": _every_value_zip64}
MUTATION = st.tuples(st.integers(0, 2**20), st.integers(0, 255))


def test_the_zip64_field_host_takes_the_fast_path(tmp_path: Path) -> None:
    path = _write(tmp_path, _every_value_zip64(tmp_path / "host"))
    _, _, members = _agree(path, fast_path=True)
    assert members == _one_by_one(path)
    assert central_header(path.read_bytes(), STORAGE)  # the builder's table is a real one
    with zipfile.ZipFile(path) as z:
        assert all(info.extra[:2] == b"\x01\x00" for info in z.infolist())


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(HOSTS)), st.lists(MUTATION, min_size=1, max_size=4), st.booleans())
def test_mutated_files_read_alike_on_both_paths(tmp_path: Path, host: str,
                                                mutations: list[tuple[int, int]],
                                                near_the_end: bool) -> None:
    """Bytes changed anywhere, or in the central directory and end records: both paths give
    the same refusal or the same table."""
    original = HOSTS[host](tmp_path / "host")
    data = bytearray(original)
    start = original.index(b"PK\x01\x02") if near_the_end else 0
    for at, value in mutations:
        data[start + at % (len(original) - start)] = value
    path = _write(tmp_path, bytes(data), "mutated.pt")
    assert _without_path(_outcome(path)) == _without_path(_outcome(path, fast=False))


@pytest.mark.parametrize("window", [1, 100, 5000, 1 << 20])
@pytest.mark.parametrize("mapped", [True, False])
def test_local_headers_read_in_any_grouping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           window: int, mapped: bool) -> None:
    """However the headers are grouped into windows (one each, a few together, all at once),
    mapped or, where the file cannot be mapped, read, every data offset is the one its own
    header gives."""
    path = tmp_path / "x.pt"
    torch.save({f"t{i}": torch.full((i % 50,), float(i)) for i in range(300)}, path)
    monkeypatch.setattr(zipdir, "_MAP_WINDOW", window)
    maps: list[int] = []
    real = mmap.mmap

    def fake_mmap(fd: int, length: int, **kwargs: Any) -> mmap.mmap:
        maps.append(length)
        if not mapped:
            raise OSError(errno.ENODEV, "no maps here")
        return real(fd, length, **kwargs)

    monkeypatch.setattr(zipdir.mmap, "mmap", fake_mmap)
    _, _, members = _agree(path, fast_path=True)
    assert members == _one_by_one(path)
    assert maps and max(maps) <= max(window, 4096 + 30)
    assert (len(maps) > 300) == (window <= 100)


def test_ascii_names_are_decoded_without_a_table_per_byte(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's names are ASCII: sliced and decoded together; names with other bytes (flagged
    # UTF-8) are decoded byte table by byte table, and both agree with zipfile.
    from exporter.torchfile import zipdir

    tables: list[int] = []
    real = zipdir._names
    monkeypatch.setattr(zipdir, "_names", lambda data, *args: tables.append(1) or real(data, *args))
    path = tmp_path / "x.pt"
    torch.save([torch.ones(2) for _ in range(50)], path)
    _, _, members = _agree(path, fast_path=True)
    assert tables == [] and len(members) > 50
    accented = [(name.replace("/data/0", "/data/é") if name.endswith("/data/0") else name, body)
                for name, body in members_of(torch_bytes([torch.ones(2)]))]
    (tmp_path / "accented.pt").write_bytes(rezip(accented))
    names = list(_agree(tmp_path / "accented.pt", fast_path=True)[2])
    assert tables and "archive/data/é" in names
