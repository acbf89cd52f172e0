"""What the zip end records tell about a torch file's pickle without reading it, and how a
step's partition files are split by it between this process and the forked reader."""

from __future__ import annotations

import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch

from exporter.neox.zero import odd_files
from exporter.neox.zero.order import child_share
from exporter.torchfile.peek import pickle_signature


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def test_one_pickle_one_signature_another_pickle_another(tmp_path: Path) -> None:
    moments = {"exp_avg": torch.zeros(4), "exp_avg_sq": torch.ones(4)}
    a = _save(tmp_path / "a.pt", moments)
    b = _save(tmp_path / "b.pt", {k: v + 1 for k, v in moments.items()})  # other bytes, one pickle
    c = _save(tmp_path / "c.pt", {"exp_avg": torch.zeros(5), "exp_avg_sq": torch.ones(4)})
    d = _save(tmp_path / "d.pt", {"exp_avg": torch.zeros(4), "exp_avg_sq": torch.ones(4), "x": 1})
    sa, sb, sc, sd = map(pickle_signature, (a, b, c, d))
    assert sa is not None and sa == sb
    assert len({sa, sc, sd}) == 3
    # The signature is what the directory says of data.pkl: its CRC-32 leads.
    with zipfile.ZipFile(a) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    assert int.from_bytes(sa[:4], "little") == info.CRC


def test_no_signature_without_a_torch_zip_that_starts_with_its_pickle(tmp_path: Path) -> None:
    assert pickle_signature(tmp_path / "missing.pt") is None
    (tmp_path / "text.pt").write_text("not a zip")
    assert pickle_signature(tmp_path / "text.pt") is None
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("archive/version", "3")
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    assert pickle_signature(tmp_path / "other.zip") is None  # data.pkl is not the first member


def test_ranks_whose_pickle_differs_in_numbers_are_rebuilt_not_read_by_a_child(
        tmp_path: Path) -> None:
    from exporter.neox.checkpoint import scan_checkpoint
    from exporter.samples import TINY, RunConfig, write_checkpoint

    # Many comm intervals over three ranks: the intervals do not split alike on every rank,
    # so one rank's pickle records other sizes: a pickle of its own, a few bytes off.
    write_checkpoint(tmp_path / "src", TINY, step=8, dp=3, config=RunConfig(max_elements_per_comm=64))
    files = scan_checkpoint(tmp_path / "src")
    paths = [files.optim_files[(r, 0)] for r in range(3)]
    signatures = [pickle_signature(Path(p)) for p in paths]
    assert None not in signatures
    assert [i for i, s in enumerate(signatures) if signatures.count(s) == 1], \
        "the fixture should have a rank with a pickle of its own"
    assert odd_files(paths, files) == []
    assert child_share(paths, files) is None


def _units(tmp_path: Path, extra: str) -> tuple[list[Path], SimpleNamespace]:
    """mp 0: ranks 0 and 1 share a pickle, rank 2 has its own; mp 1: ranks 1 and 2 share one
    (not mp 0's: other sizes), rank 0 has its own: each other pickle holds ``extra`` too."""
    sizes = {(0, 0): 3, (1, 0): 3, (2, 0): 7, (0, 1): 9, (1, 1): 4, (2, 1): 4}
    odd = {(2, 0), (0, 1)}
    tmp_path.mkdir()
    made = {key: _save(tmp_path / f"r{key[0]}_mp{key[1]}.pt",
                       {"m": torch.zeros(n), "note": extra if key in odd else ""})
            for key, n in sizes.items()}
    paths = [made[(r, mp)] for mp in range(2) for r in range(3)]
    return paths, SimpleNamespace(optim_files=made)


def test_each_unit_keeps_its_most_common_pickle(tmp_path: Path) -> None:
    # Pickles of another structure (here 1,000 bytes longer): read in full, by the child.
    paths, files = _units(tmp_path / "long", "x" * 1000)
    assert odd_files(paths, files) == [2, 3]  # type: ignore[arg-type]
    # The child reads them first, then the second unit's others.
    assert child_share(paths, files) == [2, 3, 4, 5]  # type: ignore[arg-type]
    alike = {(r, 0): files.optim_files[(r, 0)] for r in range(2)}
    assert odd_files(list(alike.values()), SimpleNamespace(optim_files=alike)) == []  # type: ignore[arg-type]
    assert child_share(list(alike.values()), SimpleNamespace(optim_files=alike)) is None  # type: ignore[arg-type]
    # Pickles a few bytes off the common one: the common one with numbers changed, rebuilt.
    paths, files = _units(tmp_path / "short", "xy")
    assert odd_files(paths, files) == []  # type: ignore[arg-type]
    assert child_share(paths, files) == [3, 4, 5]  # type: ignore[arg-type]


def test_a_file_without_a_signature_is_odd(tmp_path: Path) -> None:
    # No signature read (not a zip here; the reader names the fault when it reads it): read
    # in full on its own, never taken for the common pickle with numbers changed.
    paths, files = _units(tmp_path / "units", "")
    paths[1].write_text("not a zip")
    assert pickle_signature(paths[1]) is None
    assert odd_files(paths, files) == [1]  # type: ignore[arg-type]
    assert child_share(paths, files) == [1, 3, 4, 5]  # type: ignore[arg-type]
