"""A torch zip whose central directory is the last large one's but for checksums and its own
name takes that one's member table (``exporter.torchfile.likezip``); anything else is parsed
again, with the same result and the same messages as without a kept table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporter.errors import CheckpointFormatError
from exporter.torchfile import container, likezip, zipdir
from exporter.torchfile.container import TorchZip


@pytest.fixture(autouse=True)
def _small_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(likezip, "REMEMBER_FROM", 8)
    likezip.forget()
    yield
    likezip.forget()


def _rank(tmp_path: Path, rank: int, sizes: tuple[int, ...] = (3, 5, 7)) -> Path:
    """A partition file of ``rank`` (its values its own), named as DeepSpeed names them."""
    path = tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    torch.save({"parts": [torch.full((n + i % 2,), float(rank)) for i, n in enumerate(sizes * 20)]},
               path)
    return path


def _table(z: TorchZip) -> tuple[object, ...]:
    spans = z.storage_spans()
    return (z.prefix, z.layout(), spans, z.read_member("data.pkl", 1 << 20), z.byteorder(),
            z.member("data.pkl"), z.has("byteorder"), z.has("nothing"),
            [z.storage_member(key) for key in sorted(spans)])


def _fresh(path: Path) -> TorchZip:
    likezip.forget()
    return TorchZip(path)


def _parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = zipdir.read_fast

    def counted(*args: object) -> object:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(container, "read_fast", counted)
    return calls


def test_a_file_like_the_last_takes_its_table_and_reads_as_parsed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, other = _rank(tmp_path, 1), _rank(tmp_path, 2)
    want = _table(_fresh(other))
    calls = _parses(monkeypatch)
    likezip.forget()
    TorchZip(first)
    got = TorchZip(other)
    assert len(calls) == 1  # the second file's directory was not parsed
    assert got.prefix == "zero_pp_rank_2_mp_rank_00_optim_states/"
    assert _table(got) == want
    assert torch.equal(torch.frombuffer(bytearray(got.read(*_span(got, "0"))), dtype=torch.float32),
                       torch.full((3,), 2.0))


def _span(z: TorchZip, key: str) -> tuple[int, int]:
    offset, size = z.storage_span(key)
    return offset, size


def test_messages_name_the_files_own_members(tmp_path: Path) -> None:
    TorchZip(_rank(tmp_path, 1))
    got = TorchZip(_rank(tmp_path, 2))
    with pytest.raises(CheckpointFormatError, match="missing member "
                       "'zero_pp_rank_2_mp_rank_00_optim_states/data/999'"):
        got.storage_span("999")
    assert got.member("data.pkl").name == "zero_pp_rank_2_mp_rank_00_optim_states/data.pkl"


@pytest.mark.parametrize("renamed", [b"zero_pp_rank_2\\mp_rank_00_optim_states/",
                                     b"zero_pp_rank_2/mp_rank_00_optim_states/",
                                     b"..\x00pp_rank_2_mp_rank_00_optim_states/"])
def test_a_name_the_checks_refuse_is_parsed_again_and_refused_as_before(
        tmp_path: Path, renamed: bytes) -> None:
    """The same directory but for a prefix that a name check refuses: not taken, and the
    file's own parse gives its message."""
    first, other = _rank(tmp_path, 1), _rank(tmp_path, 2)
    data = other.read_bytes().replace(b"zero_pp_rank_2_mp_rank_00_optim_states/", renamed)
    other.write_bytes(data)
    with pytest.raises(CheckpointFormatError) as alone:
        _fresh(other)
    likezip.forget()
    TorchZip(first)
    with pytest.raises(CheckpointFormatError) as after:
        TorchZip(other)
    assert str(after.value) == str(alone.value)


def test_other_sizes_places_or_names_are_parsed_again(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first = _rank(tmp_path, 1)
    for sub in "abc":
        (tmp_path / sub).mkdir()
    others = [_rank(tmp_path / "a", 2, sizes=(3, 5, 8)),   # a member of another size
              _rank(tmp_path / "b", 12),                    # a name of another length
              _rank(tmp_path / "c", 2, sizes=(5, 3, 7))]    # members of other sizes in turn
    want = [_table(_fresh(p)) for p in others]
    calls = _parses(monkeypatch)
    for path, table in zip(others, want, strict=True):
        likezip.forget()
        TorchZip(first)
        assert _table(TorchZip(path)) == table
    assert len(calls) == 2 * len(others)  # each parsed in full


def test_small_tables_are_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(likezip, "REMEMBER_FROM", 10_000)
    calls = _parses(monkeypatch)
    TorchZip(_rank(tmp_path, 1))
    TorchZip(_rank(tmp_path, 2))
    assert len(calls) == 2
