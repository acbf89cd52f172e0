"""Files whose pickle is the one read before with numbers of tensor records changed (the ranks
at the ends of a ZeRO group, whose sub-partitions have other sizes): rebuilt with those
records read again (``exporter.torchfile.patched``), and equal to a read in full; any other
difference, and the file is read in full."""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from test_alike_files import _same, refused_as_alone, short_member
from zip_builders import members_of, rezip, torch_bytes

from exporter.torchfile import TorchFile, load_torch_file, patched
from exporter.torchfile.repeats import alike_files


def _partition(last: int, offset: int = 0, flag: bool = False) -> dict[str, object]:
    """A rank's partition file in small: the sizes of every rank but the last sub-partition,
    whose size is ``last`` (a view of a storage of 2,000 elements, from ``offset``)."""
    flat = torch.arange(2000, dtype=torch.float32)
    tail = flat[offset : offset + last]
    tail.requires_grad_(flag)
    return {"step": 12,
            "parts": [torch.full((7 + i % 5,), float(i)) for i in range(1500)] + [tail],
            "moments": [{"exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}
                        for _ in range(300)]}


def _read_after(first: Path, other: Path) -> TorchFile:
    """``other`` read right after ``first`` inside the block; equal to a read in full."""
    want = load_torch_file(other)
    with alike_files():
        load_torch_file(first)
        got = load_torch_file(other)
    _same(got, want)
    return got


def _saved(tmp_path: Path, name: str, value: object) -> Path:
    path = tmp_path / name
    torch.save(value, path)
    return path


@pytest.mark.parametrize("sizes", [(1406, 462), (0, 1488), (1488, 0), (200, 70000 // 100)])
def test_a_file_with_other_sizes_of_tensors_is_rebuilt_as_a_read_gives_it(
        tmp_path: Path, sizes: tuple[int, int]) -> None:
    """Sizes of one width and of another (``BININT1`` 0 against ``BININT2`` 1488): the
    changed record is read again, the others rebuilt."""
    first = _saved(tmp_path, "first.pt", _partition(sizes[0]))
    other = _saved(tmp_path, "other.pt", _partition(sizes[1]))
    got = _read_after(first, other)
    assert got.encoded is not None
    tail = got.obj["parts"][-1]
    assert tail.shape == (sizes[1],)
    assert torch.equal(tail.read(), torch.arange(sizes[1], dtype=torch.float32))


def test_offsets_and_several_records_change_at_once(tmp_path: Path) -> None:
    first = _saved(tmp_path, "first.pt", _partition(100, offset=0))
    other = _saved(tmp_path, "other.pt", _partition(300, offset=1500))
    got = _read_after(first, other)
    assert got.encoded is not None
    assert torch.equal(got.obj["parts"][-1].read(), torch.arange(1500, 1800, dtype=torch.float32))


def test_a_number_outside_a_tensor_record_reads_the_file_in_full(tmp_path: Path) -> None:
    first = _saved(tmp_path, "first.pt", _partition(10))
    other = _saved(tmp_path, "other.pt", {**_partition(20), "step": 13})
    assert _read_after(first, other).encoded is None


def test_a_storage_of_another_size_reads_the_file_in_full(tmp_path: Path) -> None:
    """The number that changed is a storage's (its persistent id), not the tensor's view."""
    first = _saved(tmp_path, "first.pt", _partition(10))
    value = _partition(10)
    value["parts"][3] = torch.full((9,), 3.0)  # 10 elements in the first file
    other = _saved(tmp_path, "other.pt", value)
    assert _read_after(first, other).encoded is None


class _Tensor:
    """A tensor record pickled the way torch writes one, on storage ``key``, with the size
    tuple given (shared between records when the same object is given)."""

    def __init__(self, key: str, size: tuple[int, ...]) -> None:
        self.key, self.size = key, size

    def __reduce__(self) -> tuple[object, ...]:
        return torch._utils._rebuild_tensor_v2, (_Storage(self.key), 0, self.size, (1,), False,
                                                 OrderedDict())


class _Storage:
    def __init__(self, key: str) -> None:
        self.key = key


def _crafted(tmp_path: Path, name: str, value: object) -> Path:
    """A torch zip whose pickle is ``value`` pickled here, on the storages of a file saved by
    torch (two of 8 float32 each, keys "0" and "1")."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, 2)
    pickler.persistent_id = lambda obj: (  # type: ignore[method-assign]
        ("storage", torch.FloatStorage, obj.key, "cpu", 8) if isinstance(obj, _Storage) else None)
    pickler.dump(value)
    members = members_of(torch_bytes([torch.zeros(8), torch.ones(8)]))
    path = tmp_path / name
    path.write_bytes(rezip([(n, out.getvalue() if n.endswith("data.pkl") else body)
                            for n, body in members]))
    return path


def _records(shared: tuple[int, ...]) -> dict[str, object]:
    return {"a": _Tensor("0", shared), "b": _Tensor("1", shared),
            "rest": [_Tensor(str(i % 2), (i % 8,)) for i in range(6000)]}


def test_a_size_tuple_read_again_by_a_later_record_reads_the_file_in_full(tmp_path: Path) -> None:
    """The changed number's tuple is memoized in one record and read back by the next: the
    run cannot be replayed alone."""
    first = _crafted(tmp_path, "first.pt", _records((4,)))
    other = _crafted(tmp_path, "other.pt", _records((6,)))
    got = _read_after(first, other)
    assert got.encoded is None
    assert got.obj["b"].shape == (6,)


def test_a_crafted_file_of_unshared_records_is_patched(tmp_path: Path) -> None:
    """The same crafted layout with a size tuple per record: patched, and equal to a read in
    full (so the previous test's full read is the sharing's doing)."""
    first = _crafted(tmp_path, "first.pt", _records((4,)) | {"b": _Tensor("1", tuple([4]))})
    other = _crafted(tmp_path, "other.pt", _records((6,)) | {"b": _Tensor("1", tuple([4]))})
    got = _read_after(first, other)
    assert got.encoded is not None
    assert (got.obj["a"].shape, got.obj["b"].shape) == ((6,), (4,))


def test_too_many_changed_numbers_read_the_file_in_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _saved(tmp_path, "first.pt", _partition(100, offset=0))
    other = _saved(tmp_path, "other.pt", _partition(300, offset=1500))
    monkeypatch.setattr(patched, "MAX_SITES", 1)
    assert _read_after(first, other).encoded is None


def test_moved_members_are_placed_by_their_rows_not_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle a byte longer moves every member after it: the same names in the same
    order, each found at its row of the remembered directory."""
    from exporter.torchfile import repeats

    def by_name(*_: object) -> None:
        raise AssertionError("the same member names: placed by row")

    first = _saved(tmp_path, "first.pt", _partition(0))
    other = _saved(tmp_path, "other.pt", _partition(1488))
    monkeypatch.setattr(repeats, "_placed", by_name)
    got = _read_after(first, other)
    assert got.encoded is not None
    assert torch.equal(got.obj["parts"][5].read(), torch.full((7,), 5.0))


def test_a_moved_member_of_another_size_reads_the_file_in_full(tmp_path: Path) -> None:
    first = _saved(tmp_path, "first.pt", _partition(0))
    other = short_member(tmp_path / "other.pt", _partition(1488), "7")
    assert "storage '7'" in refused_as_alone(first, other)


def test_the_prescan_gives_the_opcodes_of_a_pickle_it_covers(tmp_path: Path) -> None:
    """A pickle accepted as one seen before (numbers changed in place) gets that one's
    opcodes, which are its own."""
    import numpy as np

    from exporter.torchfile import prescan
    from exporter.torchfile.container import TorchZip
    from exporter.torchfile.opbounds import opcode_starts

    pickles = [TorchZip(_saved(tmp_path, f"{n}.pt", _partition(n))).read_member("data.pkl", 1 << 30)
               for n in (300, 400)]
    assert len(pickles[0]) == len(pickles[1]) and pickles[0] != pickles[1]
    prescan.ACCEPTED.clear()
    prescan.prescan(pickles[0])
    assert prescan.ACCEPTED.covers(pickles[1], (prescan.MAX_OPCODES, prescan.MAX_DEPTH,
                                                prescan.MAX_HASH_WORK))
    ops, own = prescan.prescan(pickles[1]), opcode_starts(pickles[1], prescan.MAX_OPCODES)
    assert ops is not None and own is not None
    assert np.array_equal(ops.starts, own.starts) and np.array_equal(ops.codes, own.codes)


def test_the_files_of_the_pickle_most_files_have_are_read_first(tmp_path: Path) -> None:
    from exporter.neox.zero.order import reading_order

    # The others after them: a zip directory like the last one's is compared, not parsed.
    paths = [_saved(tmp_path, f"{i}.pt", _partition(size))
             for i, size in enumerate((0, 1406, 462, 1406))]
    assert reading_order(paths) == [1, 3, 0, 2]


def test_a_file_read_in_full_on_an_earlier_pickles_verdict_patches_the_next(
        tmp_path: Path) -> None:
    """The next step's first file: read in full, but accepted by the prescan as the last
    step's pickle (numbers changed in place), whose opcodes it shares; the file after it is
    patched from it."""
    from exporter.torchfile import prescan

    earlier, first, other = (_saved(tmp_path, f"{n}.pt", _partition(n)) for n in (300, 400, 1406))
    prescan.ACCEPTED.clear()
    with alike_files():
        load_torch_file(earlier)
    with alike_files():
        assert load_torch_file(first).encoded is None
        got = load_torch_file(other)
    assert got.encoded is not None
    _same(got, load_torch_file(other))
