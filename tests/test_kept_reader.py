"""A reader forked once, before a build starts its threads, reads every step's partition files
with this process: batch after batch, as a reader forked for one export does."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from test_forked_loads import in_a_fresh_process

from exporter.neox.zero import load_partition_files
from exporter.torchfile import forked as module
from exporter.torchfile import load_torch_file, to_json
from exporter.torchfile.forked import ForkedLoads, kept_reader

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _files(folder: Path, name: str, count: int) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"{name}{i}.pt")
        torch.save({"name": name, "i": i, "moments": [torch.full((40,), float(i))] * 3},
                   paths[-1])
    return paths


def _read_by_child(loads: ForkedLoads, paths: list[Path]) -> list[Path]:
    """Which of ``paths`` the child read, checking each against a read here; nothing is
    claimed here before the first file arrives, so the child read that one."""
    first = loads.get(paths[0])
    assert first is not None
    assert to_json(first.obj) == to_json(load_torch_file(paths[0]).obj)
    got = [paths[0]]
    claimed = [path for path in paths if loads.claim(path)]
    for path in paths[1:]:
        tf = loads.get(path)
        if tf is not None:
            assert path not in claimed
            assert to_json(tf.obj) == to_json(load_torch_file(path).obj)
            got.append(path)
    return got


@in_a_fresh_process
def test_one_child_reads_batch_after_batch_while_other_threads_run(tmp_path: Path) -> None:
    batches = [_files(tmp_path, name, 6) for name in ("a", "b", "c")]
    release = threading.Event()
    with kept_reader() as reader:
        assert reader is not None
        other = threading.Thread(target=release.wait)
        other.start()  # a fork now would be refused: the kept child serves the batches
        try:
            assert module.ForkedReader.fork() is None
            for paths in batches:
                loads = ForkedLoads.start(paths)
                assert loads is not None and loads._pid == reader.pid
                assert _read_by_child(loads, paths)
                loads.close()
                assert reader.alive
        finally:
            release.set()
            other.join()
    with pytest.raises(ChildProcessError):
        os.waitpid(reader.pid, os.WNOHANG)  # reaped


@in_a_fresh_process
def test_a_batch_closed_early_leaves_nothing_for_the_next(tmp_path: Path) -> None:
    first, second = _files(tmp_path, "a", 8), _files(tmp_path, "b", 3)
    with kept_reader() as reader:
        assert reader is not None
        loads = ForkedLoads.start(first)
        assert loads is not None
        loads.claim(first[0])  # one claim, then the step fails
        loads.close()  # the rest are taken here: the child stops after its file
        assert reader.alive
        loads = ForkedLoads.start(second)
        assert loads is not None
        loaded = load_partition_files(second, loads)
        loads.close()
        assert [tf.obj["name"] for tf in loaded] == ["b"] * 3
        assert [tf.obj["i"] for tf in loaded] == [0, 1, 2]
        assert reader.alive


@in_a_fresh_process
def test_after_the_kept_child_dies_files_are_read_here(tmp_path: Path) -> None:
    paths = _files(tmp_path, "a", 4)
    release = threading.Event()
    with kept_reader() as reader:
        assert reader is not None
        os.kill(reader.pid, signal.SIGKILL)
        os.waitpid(reader.pid, 0)
        other = threading.Thread(target=release.wait)
        other.start()
        try:
            loads = ForkedLoads.start(paths)  # the socket is broken, and no fork now
            assert loads is None and not reader.alive
            loaded = load_partition_files(paths, loads)
        finally:
            release.set()
            other.join()
    assert [tf.obj["i"] for tf in loaded] == [0, 1, 2, 3]


@in_a_fresh_process
def test_the_child_keeps_no_descriptor_of_this_process(tmp_path: Path) -> None:
    # A pipe open when the child is forked: once this process closes its write end, its read
    # end must see the end, which it would not while the child held a copy (an archive lock, a
    # connection or a subprocess's pipe would stay open as long).
    read_end, write_end = os.pipe()
    with kept_reader() as reader:
        assert reader is not None
        loads = ForkedLoads.start(_files(tmp_path, "a", 2))  # the child is up and serving
        assert loads is not None
        loads.close()
        os.close(write_end)
        os.set_blocking(read_end, False)
        assert os.read(read_end, 1) == b""
    os.close(read_end)


@in_a_fresh_process
def test_a_build_s_steps_are_read_on_two_processes(tmp_path: Path) -> None:
    from exporter.neox import zero
    from exporter.pipeline.export import ExportOptions
    from exporter.pipeline.run import BuildOptions, build
    from exporter.samples import TINY, RunConfig, write_run
    from exporter.sources import open_source

    # Two tensor-parallel units: the child reads one while this process reads the other.
    write_run(tmp_path / "run", TINY, steps=(0, 4), dp=2, tp=2,
              config=RunConfig(max_elements_per_comm=64))
    zero.FORK_FROM_STORAGES = 0  # the tiny model's pickles: shared all the same
    from_child: list[tuple[Path, int]] = []
    real_get = ForkedLoads.get

    def get(self: ForkedLoads, path: object, runs: bool = False) -> object:
        tf = real_get(self, path, runs)
        if tf is not None:
            from_child.append((Path(str(path)), threading.active_count()))
        return tf

    ForkedLoads.get = get  # type: ignore[method-assign]
    options = BuildOptions(export=ExportOptions(include=("model", "optimizer")), quiet=True)
    try:
        summary = build(open_source(str(tmp_path / "run")), tmp_path / "two", options)
    finally:
        ForkedLoads.get = real_get  # type: ignore[method-assign]
        zero.FORK_FROM_STORAGES = 16_000
    assert [o.status for o in summary.outcomes] == ["done", "done"]
    # Both steps, while the build's threads ran (no child could have been forked then).
    assert {path.parent.name for path, _ in from_child} == {"step0", "step4"}
    assert min(threads for _, threads in from_child) > 1
    alone = build(open_source(str(tmp_path / "run")), tmp_path / "one", options)  # read here only
    assert [o.status for o in alone.outcomes] == ["done", "done"]
    written = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.safetensors"))
    assert len(written) >= 8
    assert written == sorted(p.relative_to(tmp_path / "two")
                             for p in (tmp_path / "two").rglob("*.safetensors"))
    for path in written:
        assert (tmp_path / "two" / path).read_bytes() == (tmp_path / "one" / path).read_bytes()


@in_a_fresh_process
def test_a_build_whose_partition_pickles_are_small_forks_no_reader(tmp_path: Path) -> None:
    # The Pythia layout: the first step's files say so, and the build forks nothing (a fork
    # costs copy-on-write faults for the whole build); nor where one unit's files have one
    # pickle but for numbers (rebuilt from the one read); with files worth sharing, it forks one.
    from exporter.neox import zero
    from exporter.pipeline.export import ExportOptions
    from exporter.pipeline.run import BuildOptions, build
    from exporter.samples import TINY, write_run
    from exporter.sources import open_source

    write_run(tmp_path / "run", TINY, steps=(0, 4), dp=2)
    write_run(tmp_path / "units", TINY, steps=(0, 4), dp=2, tp=2)
    forks: list[object] = []
    real = module.ForkedReader.fork.__func__  # type: ignore[attr-defined]

    def fork(cls: type) -> object:
        forks.append(real(cls))
        return forks[-1]

    options = BuildOptions(export=ExportOptions(include=("model", "optimizer")), quiet=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module.ForkedReader, "fork", classmethod(fork))
        build(open_source(str(tmp_path / "run")), tmp_path / "small", options)
        assert forks == []
        patch.setattr(zero, "FORK_FROM_STORAGES", 0)
        build(open_source(str(tmp_path / "run")), tmp_path / "alike", options)
        assert forks == []
        build(open_source(str(tmp_path / "units")), tmp_path / "shared", options)
    assert len(forks) == 1 and forks[0] is not None


def test_steps_not_fetched_yet_get_a_reader_and_other_builds_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A Hub source's steps are not on this machine before their download: the build keeps a
    # reader for them. Builds that write no optimizer state, or convert in worker processes
    # or Ray tasks, keep none.
    from contextlib import nullcontext

    from exporter.pipeline import run
    from exporter.pipeline.export import ExportOptions
    from exporter.sources.base import Source

    class Remote(Source):
        uri = "hf://org/remote"

        def steps(self) -> list[int]:
            return [1000, 2000]

        def fetch(self, step: int) -> object:
            raise AssertionError("nothing is fetched to decide")

    kept: list[int] = []
    monkeypatch.setattr(run, "kept_reader", lambda: kept.append(1) or nullcontext())
    for options, want in [
        (run.BuildOptions(), 1),
        (run.BuildOptions(export=ExportOptions(include=("model",))), 0),
        (run.BuildOptions(workers=2), 0),
        (run.BuildOptions(executor="ray"), 0),
    ]:
        kept.clear()
        with run._reader_for(Remote(), options):
            pass
        assert len(kept) == want, options
