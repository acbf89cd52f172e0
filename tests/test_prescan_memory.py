"""The prescan's memory of the pickles it accepted (``exporter.torchfile.prescan._Accepted``).

A pickle that differs from one accepted lately only in the values of fixed-width numbers is
accepted without a scan; any other difference is scanned, and the verdict must be the exact
walker's, whatever was remembered.
"""

from __future__ import annotations

import pickletools
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from prescan_cases import data_pkl

from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile import load_torch_file, prescan


@pytest.fixture(autouse=True)
def forgetting() -> Iterator[None]:
    prescan.ACCEPTED.clear()
    yield
    prescan.ACCEPTED.clear()


def _partition(sizes: list[int], step: int, lr: float) -> dict[str, object]:
    """What a ZeRO partition file holds, in small: many tensors, a step count, a rate."""
    return {"step": step, "lr": lr, "parts": [torch.full((n,), float(n)) for n in sizes],
            "moments": [{"exp_avg": torch.zeros(n), "exp_avg_sq": torch.ones(n)} for n in sizes]}


def _sizes(rng: random.Random) -> list[int]:
    # 300-60,000: every size written as BININT2, so the pickles of two draws have one length.
    return [rng.randrange(300, 60_000) for _ in range(400)]


def _outcome(check: Callable[[], None]) -> str:
    try:
        check()
    except (UnsafePickleError, CheckpointFormatError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def _number_bytes(data: bytes) -> list[int]:
    """Offsets of the bytes that hold the values of BININT, BININT1, BININT2 and BINFLOAT."""
    widths = {"BININT": 4, "BININT1": 1, "BININT2": 2, "BINFLOAT": 8}
    return [at + 1 + i for op, _, at in pickletools.genops(data) if op.name in widths
            for i in range(widths[op.name])]


def _no_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("scanned")

    monkeypatch.setattr(prescan, "accepted_opcodes", refuse)
    monkeypatch.setattr(prescan, "walk", refuse)


def test_a_pickle_of_other_numbers_is_not_scanned(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(1)
    first, second = _partition(_sizes(rng), 5, 0.1), _partition(_sizes(rng), 9, 0.25)
    torch.save(first, tmp_path / "rank0.pt")
    torch.save(second, tmp_path / "rank1.pt")
    a, b = data_pkl(first), data_pkl(second)
    assert len(a) == len(b) > prescan.ACCEPTED.REMEMBER_FROM and a != b
    load_torch_file(tmp_path / "rank0.pt")
    _no_scan(monkeypatch)
    loaded = load_torch_file(tmp_path / "rank1.pt").obj
    # Unpickled from its own bytes: its own sizes and numbers.
    assert (loaded["step"], loaded["lr"]) == (9, 0.25)
    assert [t.shape for t in loaded["parts"]] == [t.shape for t in second["parts"]]  # type: ignore[attr-defined]


def test_any_other_difference_gets_the_walkers_verdict() -> None:
    """Edits to a remembered pickle, in its numbers' bytes and anywhere: whatever the memory
    holds, the verdict is the exact walker's on the edited bytes."""
    rng = random.Random(7)
    original = data_pkl(_partition(_sizes(rng), 3, 0.5))
    numbers = _number_bytes(original)
    covered = 0
    for trial in range(80):
        edited = bytearray(original)
        for _ in range(rng.randrange(1, 4)):
            at = rng.choice(numbers) if trial % 2 else rng.randrange(len(edited))
            edited[at] = rng.randrange(256)
        data = bytes(edited)
        prescan.ACCEPTED.clear()
        prescan.prescan(original)
        assert prescan.ACCEPTED.entries
        remembered = prescan.ACCEPTED.covers(data, (prescan.MAX_OPCODES, prescan.MAX_DEPTH,
                                                    prescan.MAX_HASH_WORK))
        covered += remembered
        assert (_outcome(lambda: prescan.prescan(data))  # noqa: B023 - called at once
                == _outcome(lambda: prescan.walk(data)))  # noqa: B023
        if trial % 2 and data != original:
            assert remembered
    assert 40 <= covered < 80


def test_a_memo_read_of_a_slot_never_set_is_refused() -> None:
    original = data_pkl(_partition(_sizes(random.Random(3)), 3, 0.5))
    prescan.prescan(original)
    get = next(at for op, _, at in pickletools.genops(original) if op.name == "BINGET")
    edited = bytearray(original)
    edited[get + 1] = 255  # no slot that high is set this early
    with pytest.raises(CheckpointFormatError, match="memo slot 255 that was never set"):
        prescan.prescan(bytes(edited))


def test_a_pickle_is_remembered_with_the_limits_it_passed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = data_pkl(_partition(_sizes(random.Random(5)), 3, 0.5))
    prescan.prescan(data)
    count = sum(1 for _ in pickletools.genops(data))
    monkeypatch.setattr(prescan, "MAX_OPCODES", count - 1)
    with pytest.raises(UnsafePickleError, match="more than"):
        prescan.prescan(data)
