"""Opening a torch zip file of tens of thousands of members: the zipfile way and the numpy way.

    python benchmarks/zipdir.py [--tensors 36000] [--repeats 5] [--workdir DIR]

Writes (once, then reuses) a ``torch.save`` file shaped like a ZeRO optimizer partition of many
small comm intervals: one storage member per tensor, ``--tensors`` of them. Then, best of
``--repeats``, the seconds to open it and to look up every storage member:

- ``zipfile + pread``: what ``TorchZip`` did before: ``zipfile.ZipFile(...).infolist()``,
  then one ``pread`` of the 30-byte local header per member looked up (kept here as
  ``_FormerTorchZip``);
- ``TorchZip, zipfile directory``: today's ``TorchZip`` with its numpy directory reader
  declined, so :mod:`zipfile` parses the central directory (the path of files with a comment
  or prepended bytes);
- ``TorchZip``: the numpy central directory reader and the local headers read together.

The look-ups run inside ``TorchZip.open()``, as ``load_torch_file`` does; the garbage
collector is paused as there. Prints one line per way.
"""

from __future__ import annotations

import argparse
import gc
import os
import struct
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from measure import machine  # noqa: E402

from exporter.torchfile.container import _STORAGE_KEY, Member, _unsafe_name  # noqa: E402


def write_file(path: Path, tensors: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    state = {}
    for i in range(tensors // 3):
        numel = int(torch.randint(1, 200, (1,), generator=generator))
        state[i] = {name: torch.randn(numel, generator=generator)
                    for name in ("exp_avg", "exp_avg_sq", "fp32_partition")}
    torch.save({"optimizer_state_dict": {"state": state, "param_groups": [{"lr": 1e-4}]}},
               path)


def storage_keys(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    prefix = next(n for n in names if n.endswith("/data.pkl"))[: -len("data.pkl")]
    return [n[len(prefix) + len("data/"):] for n in names if n.startswith(prefix + "data/")]


class _FormerTorchZip:
    """``TorchZip`` as it was: a tuple per ZipInfo, then per member looked up one ``pread`` of
    its local header, checks, a ``Member`` and a cache entry (the refusals left out)."""

    _local = struct.Struct("<IHHHHHIIIHH")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file_size = path.stat().st_size
        if not zipfile.is_zipfile(path):
            raise ValueError(path)
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
        self._infos = {i.filename: (i.compress_type, i.header_offset, i.file_size)
                       for i in infos}
        assert len(self._infos) == len(infos)
        assert not any(_unsafe_name(name) for name in self._infos)
        prefixes = [n[: -len("data.pkl")] for n in self._infos
                    if n.endswith("/data.pkl") and n.count("/") == 1]
        self.prefix = prefixes[0]
        self._members: dict[str, Member] = {}
        self.fd = os.open(path, os.O_RDONLY)

    def member(self, name: str) -> Member:
        if name in self._members:
            return self._members[name]
        filename = self.prefix + name
        compress_type, header_offset, file_size = self._infos[filename]
        assert compress_type == zipfile.ZIP_STORED and 0 <= header_offset < self.file_size
        fields = self._local.unpack(os.pread(self.fd, self._local.size, header_offset))
        assert fields[0] == 0x04034B50
        data_offset = header_offset + self._local.size + fields[9] + fields[10]
        assert data_offset + file_size <= self.file_size
        member = Member(filename, data_offset, file_size)
        self._members[name] = member
        return member

    def storage_member(self, key: str) -> Member:
        assert isinstance(key, str) and _STORAGE_KEY.match(key)
        return self.member(f"data/{key}")


def _zipfile_way(path: Path, keys: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    zip_ = _FormerTorchZip(path)
    opened = time.perf_counter()
    try:
        for key in keys:
            zip_.storage_member(key)
    finally:
        os.close(zip_.fd)
    return opened - start, time.perf_counter() - opened


def _torchzip_way(path: Path, keys: list[str]) -> tuple[float, float]:
    from exporter.torchfile.container import TorchZip

    start = time.perf_counter()
    zip_ = TorchZip(path)
    opened = time.perf_counter()
    with zip_.open():
        for key in keys:
            zip_.storage_member(key)
    return opened - start, time.perf_counter() - opened


def _torchzip_zipfile_directory(path: Path, keys: list[str]) -> tuple[float, float]:
    from exporter.torchfile import container

    with mock.patch.object(container, "read_fast", lambda path, size: None):
        return _torchzip_way(path, keys)


def best_of(way: Callable[[Path, list[str]], tuple[float, float]], path: Path, keys: list[str],
            repeats: int) -> tuple[float, float, float]:
    """Seconds to open and to look up every storage member (each the best of ``repeats``),
    and the best total."""
    runs = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            runs.append(way(path, keys))
        finally:
            gc.enable()
    return (min(r[0] for r in runs), min(r[1] for r in runs), min(sum(r) for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=36_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "neox-exporter-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"zipdir-{args.tensors}.pt"
    if not path.exists():
        write_file(path, args.tensors)
    keys = storage_keys(path)
    from exporter.torchfile.container import TorchZip

    assert TorchZip(path).fast_path
    print(f"{path}: {len(keys)} storage members, {path.stat().st_size / 1e6:.1f} MB; "
          f"{', '.join(machine().values())}")
    ways = {"zipfile + pread (before)": _zipfile_way,
            "TorchZip, zipfile directory": _torchzip_zipfile_directory,
            "TorchZip": _torchzip_way}
    results = {name: best_of(way, path, keys, args.repeats) for name, way in ways.items()}
    before = results["zipfile + pread (before)"][2]
    print(f"{'seconds':30s} {'open':>8s} {'look-ups':>9s} {'total':>8s}")
    for name, (opening, looking_up, total) in results.items():
        print(f"{name:30s} {opening:8.4f} {looking_up:9.4f} {total:8.4f}  "
              f"({before / total:4.1f}x)")


if __name__ == "__main__":
    main()
