"""Files whose pickle is the one read just before (``exporter.torchfile.repeats``): rebuilt from
that one's records, and equal to a read in full, each storage where its own file holds it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_forked_loads import in_a_fresh_process
from zip_builders import members_of, rezip, torch_bytes

from exporter.errors import CheckpointFormatError
from exporter.torchfile import TorchFile, load_torch_file, repeats, to_json
from exporter.torchfile.repeats import REMEMBER_FROM, alike_files


def _partition(rank: int) -> dict[str, object]:
    """A rank's partition file in small: the same structure and sizes on every rank (one
    pickle), its own values."""
    return {"step": 12, "lr": 0.5,
            "parts": [torch.full((7 + i % 5,), float(rank)) for i in range(1500)],
            "moments": [{"exp_avg": torch.zeros(3) + rank, "exp_avg_sq": torch.ones(3)}
                        for _ in range(300)]}


def _records(tf: TorchFile) -> list[tuple[object, ...]]:
    return [(key, str(r.storage.path), r.storage.key, r.storage.file_offset, r.storage.numel,
             r.storage.dtype, r.offset, r.shape, r.stride, r.requires_grad)
            for key, r in tf.tensors()]


def _same(got: TorchFile, want: TorchFile) -> None:
    assert got.path == want.path and got.globals == want.globals
    assert to_json(got.obj) == to_json(want.obj)
    assert _records(got) == _records(want)


def _rebuilt_as_read(first: Path, other: Path) -> TorchFile:
    """``other`` read right after ``first`` inside the block: rebuilt, and equal to a read in
    full."""
    want = load_torch_file(other)
    with alike_files():
        load_torch_file(first)
        got = load_torch_file(other)
    assert got.encoded is not None
    _same(got, want)
    return got


def _ranks(tmp_path: Path, count: int) -> list[Path]:
    paths = []
    for rank in range(count):
        paths.append(tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.save(_partition(rank), paths[-1])
    return paths


def test_a_file_of_the_same_pickle_is_rebuilt_as_a_read_gives_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _ranks(tmp_path, 3)
    want = [load_torch_file(p) for p in paths]
    assert all(w.encoded is None for w in want)  # outside the block: read in full

    def no_placing(*_: object) -> None:
        raise AssertionError("a zip of the same layout: its storages are where the first's are")

    monkeypatch.setattr(repeats, "_placed", no_placing)
    with alike_files():
        got = [load_torch_file(p) for p in paths]
    assert [g.encoded is not None for g in got] == [False, True, True]
    for g, w in zip(got, want, strict=True):
        _same(g, w)
    assert torch.equal(got[2].obj["parts"][4].read(), torch.full((11,), 2.0))


def test_storages_are_placed_where_the_new_file_holds_them(tmp_path: Path) -> None:
    """The same pickle in a zip laid out otherwise (a member more before the storages): each
    storage record gives this file's offsets, not the first file's."""
    first = tmp_path / "first.pt"
    torch.save(_partition(0), first)
    members = members_of(torch_bytes(_partition(1)))
    moved = tmp_path / "moved.pt"
    moved.write_bytes(rezip([("archive/padding", b"x" * 5000), *members]))
    got = _rebuilt_as_read(first, moved)
    assert _records(got) != [(*r[:1], str(first), *r[2:]) for r in _records(load_torch_file(first))]
    assert torch.equal(got.obj["parts"][0].read(), torch.full((7,), 1.0))


def test_members_of_one_place_but_other_names_are_placed_by_name(tmp_path: Path) -> None:
    """Two zips alike in every offset and size, two storages' names swapped: the storages are
    placed by their names in the new file."""
    members = members_of(torch_bytes(_partition(1)))
    names = [name for name, _ in members]
    a, b = names.index("archive/data/0"), names.index("archive/data/5")
    assert len(members[a][1]) == len(members[b][1])
    swapped = list(members)
    swapped[a], swapped[b] = (names[b], members[a][1]), (names[a], members[b][1])
    first, other = tmp_path / "first.pt", tmp_path / "other.pt"
    first.write_bytes(rezip(members))
    other.write_bytes(rezip(swapped))
    _rebuilt_as_read(first, other)


def short_member(path: Path, value: object, member: str) -> Path:
    """``value`` saved to ``path`` with storage ``member``'s bytes four short of its record."""
    path.write_bytes(rezip([(name, body[:-4] if name == f"archive/data/{member}" else body)
                            for name, body in members_of(torch_bytes(value))]))
    return path


def refused_as_alone(first: Path, broken: Path) -> str:
    """``broken`` read right after ``first`` inside the block: refused with the message it
    gets read alone (read in full for the reader's message), which is returned."""
    with pytest.raises(CheckpointFormatError) as alone:
        load_torch_file(broken)
    with alike_files():
        load_torch_file(first)
        with pytest.raises(CheckpointFormatError) as after:
            load_torch_file(broken)
    assert str(after.value) == str(alone.value)
    return str(alone.value)


def test_a_storage_that_does_not_fit_is_read_in_full_for_the_readers_message(
        tmp_path: Path) -> None:
    first = tmp_path / "first.pt"
    torch.save(_partition(0), first)
    short = short_member(tmp_path / "short.pt", _partition(1), "5")
    assert "storage '5'" in refused_as_alone(first, short)


def test_other_pickles_and_small_ones_are_read_in_full(tmp_path: Path) -> None:
    paths = _ranks(tmp_path, 1)
    other = tmp_path / "other.pt"
    torch.save({**_partition(0), "step": 13}, other)
    small = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for path in small:
        torch.save({"w": torch.ones(2)}, path)
    assert os.path.getsize(small[0]) < REMEMBER_FROM
    with alike_files():
        assert load_torch_file(paths[0]).encoded is None
        assert load_torch_file(other).encoded is None
        assert [load_torch_file(p).encoded for p in small] == [None, None]


def test_nothing_is_kept_past_the_block(tmp_path: Path) -> None:
    from exporter.torchfile.repeats import REPEATS

    paths = _ranks(tmp_path, 2)
    with alike_files():
        load_torch_file(paths[0])
        assert REPEATS.entry is not None
    assert REPEATS.entry is None
    assert load_torch_file(paths[1]).encoded is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@in_a_fresh_process
def test_a_forked_reader_sends_alike_files_as_a_read_gives_them(tmp_path: Path) -> None:
    from exporter.neox.zero import load_partition_files
    from exporter.torchfile.forked import ForkedLoads

    paths = _ranks(tmp_path, 6)
    forked = ForkedLoads.start(paths)
    assert forked is not None
    try:
        loaded = load_partition_files(paths, forked)
    finally:
        forked.close()
    for got, path in zip(loaded, paths, strict=True):
        _same(got, load_torch_file(path))
