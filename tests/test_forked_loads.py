"""Partition files read by a forked child arrive as the reader in this process would read them:
the same values, tensors and shared storages, the same errors; anything the child does not
send is read here."""

from __future__ import annotations

import argparse
import functools
import inspect
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.errors import CheckpointFormatError
from exporter.torchfile import TensorRef, load_torch_file, to_json
from exporter.torchfile.forked import ForkedLoads

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")


def _start(paths: list[Path]) -> ForkedLoads:
    forked = ForkedLoads.start(paths)
    assert forked is not None
    return forked


def in_a_fresh_process(test: Callable[[Path], None]) -> Callable[[Path], None]:
    """Run ``test`` here when this process runs one thread, else in a new pytest process
    (earlier tests of the suite may leave threads running, and no child is forked then)."""

    @functools.wraps(test)
    def run(tmp_path: Path) -> None:
        if threading.active_count() == 1:
            test(tmp_path)
            return
        node = f"{inspect.getfile(test)}::{test.__name__}"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               node], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert "1 passed" in done.stdout

    return run


def _tensors(obj: object) -> list[TensorRef]:
    out: list[TensorRef] = []

    def walk(value: object) -> None:
        if isinstance(value, TensorRef):
            out.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(obj)
    return out


@in_a_fresh_process
def test_a_forked_read_equals_a_read_here(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32)
    state = {
        "weights": OrderedDict([("a", base[:12].view(3, 4)), ("b", base[12:])]),
        "again": base[:12].view(3, 4),
        "moments": [{"exp_avg": torch.zeros(5), "exp_avg_sq": torch.ones(5, dtype=torch.bfloat16)}
                    for _ in range(20)],
        ("tuple", 1): (1, 2.5, None, True, b"raw", "text", float("nan")),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "dtype": torch.float16,
        "args": argparse.Namespace(lr=0.1, betas=(0.9, 0.95)),
        "big": 2**80,
        "subs": [base[:4], base[4:8], base[:4]],
        "by_number": {1: torch.zeros(2), 2: torch.ones(2)},
    }
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"f{i}.pt")
        torch.save(state, paths[-1])
    forked = _start(paths)
    try:
        for path in paths:
            got = forked.get(path)
            here = load_torch_file(path)
            assert got is not None and got.path == here.path and got.globals == here.globals
            assert to_json(got.obj) == to_json(here.obj)
            assert type(got.obj["weights"]) is OrderedDict
            refs, want = _tensors(got.obj), _tensors(here.obj)
            assert [(r.dtype, r.shape, r.stride, r.offset, r.file_offset, r.numel) for r in refs] \
                == [(r.dtype, r.shape, r.stride, r.offset, r.file_offset, r.numel) for r in want]
            # Views of one storage share one record, as they do when read here.
            assert got.obj["weights"]["a"].storage is got.obj["weights"]["b"].storage
            assert torch.equal(got.obj["again"].read(), base[:12].view(3, 4))
            assert got.obj["args"].qualname == "argparse.Namespace"
            assert isinstance(got.obj["array"], np.ndarray)
            assert got.obj["array"].tolist() == [[0, 1, 2], [3, 4, 5]]
    finally:
        forked.close()


@in_a_fresh_process
def test_errors_come_back_as_the_reader_raises_them(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointFormatError) as here:
        load_torch_file(bad)
    forked = _start([bad, good])
    try:
        with pytest.raises(CheckpointFormatError) as there:
            forked.get(bad)
        assert str(there.value) == str(here.value)
        assert forked.get(good) is not None
    finally:
        forked.close()


@in_a_fresh_process
def test_values_the_child_does_not_send_are_read_here(tmp_path: Path) -> None:
    from exporter.neox.zero import load_partition_files

    path = tmp_path / "set.pt"
    torch.save({"tags": {1, 2, 3}, "w": torch.ones(2)}, path)
    forked = _start([path])
    try:
        assert forked.get(path) is None
        [loaded] = load_partition_files([path], forked)
    finally:
        forked.close()
    assert loaded.obj["tags"] == {1, 2, 3}


def test_no_child_is_forked_while_another_thread_runs(tmp_path: Path) -> None:
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert ForkedLoads.start([tmp_path / "x.pt"]) is None
    finally:
        release.set()
        other.join()


@in_a_fresh_process
def test_the_two_processes_share_the_files_as_they_claim_them(tmp_path: Path) -> None:
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"f{i}.pt")
        torch.save({"i": i, "moments": [torch.full((50,), float(i)) for _ in range(30)]}, paths[-1])
    forked = _start(paths)
    try:
        # Nothing is claimed here before the first file arrives: the child took it.
        first = forked.get(paths[0])
        assert first is not None
        assert to_json(first.obj) == to_json(load_torch_file(paths[0]).obj)
        here = [path for path in paths if forked.claim(path)]
        assert paths[0] not in here
        for path in paths[1:]:
            got = forked.get(path)
            if path in here:
                assert got is None  # this process reads it
                continue
            assert got is not None, path
            assert to_json(got.obj) == to_json(load_torch_file(path).obj)
        assert not forked.claim(paths[0])  # asked again: still the child's
    finally:
        forked.close()


def _forked_export_equals_one_here(tmp_path: Path, dp: int, tp: int) -> list[int]:
    """Export a many-interval sample with a forked reader and without: the same files and
    records. Returns the indices the child was given to read first."""
    from exporter.neox import zero
    from exporter.pipeline import export as export_module
    from exporter.pipeline.export import ExportOptions, export_checkpoint
    from exporter.samples import TINY, RunConfig, write_checkpoint

    write_checkpoint(tmp_path / "src", TINY, step=8, dp=dp, tp=tp,
                     config=RunConfig(max_elements_per_comm=64))
    zero.FORK_FROM_STORAGES = 0  # the tiny model's pickles: forked all the same
    started: list[object] = []
    firsts: list[int] = []
    real = ForkedLoads.start

    def start(paths: list[Path], child_first: list[int]) -> ForkedLoads | None:
        firsts.extend(child_first)
        started.append(real(paths, child_first))
        return started[-1]

    export_module.ForkedLoads.start = start  # type: ignore[method-assign]
    try:
        forked = export_checkpoint(tmp_path / "src", tmp_path / "forked", ExportOptions())
    finally:
        export_module.ForkedLoads.start = real  # type: ignore[method-assign]
        zero.FORK_FROM_STORAGES = 16_000
    if tp == 1:  # one unit, one pickle but for numbers: rebuilt here, no child forked
        assert started == []
        return firsts
    assert len(started) == 1 and started[0] is not None
    here = export_checkpoint(tmp_path / "src", tmp_path / "here", ExportOptions())
    assert forked.file_sha256 == here.file_sha256
    assert [(r.job.name, r.job.kind, r.digest) for r in forked.records] == \
        [(r.job.name, r.job.kind, r.digest) for r in here.records]
    assert (tmp_path / "forked" / "state.json").read_bytes() == \
        (tmp_path / "here" / "state.json").read_bytes()
    return firsts


@in_a_fresh_process
def test_an_export_of_one_unit_of_one_pickle_forks_no_reader(tmp_path: Path) -> None:
    assert _forked_export_equals_one_here(tmp_path, dp=4, tp=1) == []


@in_a_fresh_process
def test_a_forked_export_of_two_units_writes_the_same_files(tmp_path: Path) -> None:
    # Two tensor-parallel units of three ranks, whose pickles differ in numbers: the child
    # reads the second unit, from its own pipe, while this process reads the first, then
    # claims the second's files from the child's pipe.
    firsts = _forked_export_equals_one_here(tmp_path, dp=3, tp=2)
    assert sorted(firsts) == [3, 4, 5]


@in_a_fresh_process
def test_files_a_dead_child_took_are_read_here(tmp_path: Path) -> None:
    import os
    import signal

    from exporter.neox.zero import load_partition_files

    paths = []
    for i in range(6):
        paths.append(tmp_path / f"f{i}.pt")
        torch.save({"i": i, "w": torch.full((4,), float(i))}, paths[-1])
    forked = _start(paths)
    try:
        os.kill(forked._pid, signal.SIGKILL)  # whatever it took, it never sends
        loaded = load_partition_files(paths, forked)
    finally:
        forked.close()
    assert [tf.obj["i"] for tf in loaded] == list(range(6))
    assert [tf.path for tf in loaded] == paths


@in_a_fresh_process
def test_a_channel_that_fails_ends_the_child_s_share(tmp_path: Path) -> None:
    # A receive error (the connection reset, say) counts as the child's end: the files it
    # took are read here, and no wait for them hangs.
    from exporter.neox.zero import load_partition_files
    from exporter.torchfile import forked as module

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"f{i}.pt")
        torch.save({"i": i}, paths[-1])
    with pytest.MonkeyPatch.context() as patch:
        def reset(channel: object, size: int) -> None:
            raise ConnectionResetError("reset by peer")

        patch.setattr(module, "receive", reset)
        forked = _start(paths)
        try:
            loaded = load_partition_files(paths, forked)
        finally:
            forked.close()
    assert [tf.obj["i"] for tf in loaded] == list(range(4))


def test_small_partition_pickles_are_read_without_a_fork(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.neox import zero
    from exporter.neox.checkpoint import scan_checkpoint
    from exporter.samples import TINY, RunConfig, write_checkpoint
    from exporter.torchfile.peek import member_count

    write_checkpoint(tmp_path / "one", TINY, step=8, dp=2)
    write_checkpoint(tmp_path / "many", TINY, step=8, dp=2,
                     config=RunConfig(max_elements_per_comm=64))
    one, many = scan_checkpoint(tmp_path / "one"), scan_checkpoint(tmp_path / "many")
    counts = {name: sum(member_count(p) or 0 for p in files.optim_files.values())
              for name, files in (("one", one), ("many", many))}
    # The end records count one member per storage: the many-interval files hold more.
    assert counts["many"] > 3 * counts["one"] > 0
    assert zero.shared_files(many) == []  # a tiny model: below the default
    monkeypatch.setattr(zero, "FORK_FROM_STORAGES", counts["one"] + 1)
    assert zero.shared_files(one) == []
    assert zero.shared_files(many) == [many.optim_files[(r, 0)] for r in range(2)]
    assert member_count(tmp_path / "missing.pt") is None


def test_lists_and_dicts_of_tensors_travel_as_one_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sub-partitions and moments of a ZeRO file of many intervals: rebuilt with C-level
    # maps, not a decoding call per tensor; the same records as the file read here.
    import marshal

    from exporter.torchfile import sendable

    base = torch.arange(8, dtype=torch.float32)
    subs = [base[i : i + 2] for i in range(6)]
    state = {"subs": [*subs, subs[0]],
             "moments": [{"exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}
                         for _ in range(300)],
             "mixed": [torch.zeros(1), 3], "numbered": {0: torch.ones(1)}}
    torch.save(state, tmp_path / "f.pt")
    here = load_torch_file(tmp_path / "f.pt")
    encoded, refs, storages, _ = sendable.Encoder().encode_file(here)
    calls: list[object] = []
    real = sendable.Decoder.decode

    def counted(self: sendable.Decoder, value: object) -> object:
        calls.append(value)
        return real(self, value)

    monkeypatch.setattr(sendable.Decoder, "decode", counted)
    message = marshal.loads(marshal.dumps((encoded, refs, storages)))
    got = sendable.Decoder(tmp_path / "f.pt", message[1], message[2]).decode(message[0])
    assert len(calls) < 320  # a call per container, none per tensor of the lists and dicts
    assert to_json(got) == to_json(here.obj)
    pairs = list(zip(_tensors(got), _tensors(here.obj), strict=True))
    assert [(a.file_offset, a.shape, a.stride, a.numel) for a, _ in pairs] \
        == [(b.file_offset, b.shape, b.stride, b.numel) for _, b in pairs]
    assert got["subs"][0] is got["subs"][6] and got["subs"][0].storage is got["subs"][1].storage
    assert type(got["numbered"]) is dict and torch.equal(got["numbered"][0].read(), torch.ones(1))
