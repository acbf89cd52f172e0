"""One pass over the bytes: BLAKE3 tensor digests (old sha256 indexes still verify), files
written in parallel, optional statistics, and ZeRO partitions of many small comm intervals
gathered into full chunks with the same output as their one-interval twin."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from exporter.archive.schema import TENSOR_SCHEMA
from exporter.convert.digest import index_digest, tensor_digest
from exporter.convert.stream import FILES_AT_ONCE, Converter, FileTask
from exporter.errors import ArchiveError, ExporterError
from exporter.neox.zero.common import FlatLayout, Segment
from exporter.pipeline.export import ExportOptions, export_checkpoint
from exporter.pipeline.run import BuildOptions, build
from exporter.records import TensorJob, chunks_of
from exporter.samples import TINY, RunConfig, write_checkpoint, write_run
from exporter.sources import LocalSource
from exporter.torchfile import load_torch_file
from exporter.verify import verify_path


def test_tensor_digests_are_blake3_or_sha256_by_name() -> None:
    assert tensor_digest("blake3", b"abc") == blake3.blake3(b"abc").hexdigest()
    assert tensor_digest("sha256", b"abc") == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(ArchiveError, match="unknown digest algorithm 'md5'"):
        tensor_digest("md5", b"abc")


def test_index_digest_reads_new_and_old_rows() -> None:
    assert index_digest({"digest": "d", "digest_algorithm": "blake3"}) == ("blake3", "d")
    assert index_digest({"sha256": "s", "name": "w"}) == ("sha256", "s")
    with pytest.raises(ArchiveError, match="'w' holds no tensor digest"):
        index_digest({"name": "w"})


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    write_run(run, TINY, steps=(2,), dp=2)
    out = tmp_path_factory.mktemp("archive") / "a"
    build(LocalSource(run), out, BuildOptions(quiet=True))
    return out


def _rewrite_index_as_sha256(archive: Path, tamper: bool) -> None:
    """Turn the step's index into the format written before BLAKE3: a sha256 column."""
    shard = archive / "index" / "tensors" / "step2.parquet"
    rows = pq.read_table(shard).to_pylist()
    for row in rows:
        with open(archive / row["file"], "rb") as fh:
            fh.seek(row["data_offset_begin"])
            data = fh.read(row["data_offset_end"] - row["data_offset_begin"])
        row.pop("digest", None)
        row.pop("digest_algorithm", None)
        row["sha256"] = hashlib.sha256(data).hexdigest()
    if tamper:
        rows[3]["sha256"] = "0" * 64
    fields = [f for f in TENSOR_SCHEMA if not f.name.startswith("digest")]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([*fields, pa.field("sha256", pa.string())])), shard)


def test_verify_checks_blake3_digests_and_old_sha256_indexes(archive: Path) -> None:
    rows = pq.read_table(archive / "index" / "tensors").to_pylist()
    assert {r["digest_algorithm"] for r in rows} == {"blake3"}
    (report,) = verify_path(archive)
    assert report.ok, report.text()
    _rewrite_index_as_sha256(archive, tamper=False)
    (report,) = verify_path(archive)
    assert report.ok, report.text()
    _rewrite_index_as_sha256(archive, tamper=True)
    (report,) = verify_path(archive)
    assert not report.ok and "sha256 does not match the index" in report.text()


def _jobs(prefix: str, sizes: list[int]) -> list[TensorJob]:
    g = torch.Generator().manual_seed(len(prefix))
    return [TensorJob(f"{prefix}.{i}", "master", torch.float32, (n,), chunks_of(torch.randn(n, generator=g)))
            for i, n in enumerate(sizes)]


def test_parallel_files_equal_files_written_one_by_one(tmp_path: Path) -> None:
    tasks = {name: _jobs(name, sizes) for name, sizes in
             (("small", [10, 0, 3]), ("large", [70_000, 5]), ("middle", [30_000]))}

    def write(workers: int, folder: Path) -> tuple[list, list]:
        converter = Converter(chunk_bytes=4096, workers=workers)
        records = converter.write_files(
            [FileTask(folder / f"{name}.safetensors", jobs) for name, jobs in tasks.items()], folder)
        return records, converter.written_files

    serial, serial_files = write(1, tmp_path / "serial")
    parallel, parallel_files = write(3, tmp_path / "parallel")
    assert [r.job.name for r in parallel] == [j.name for jobs in tasks.values() for j in jobs]
    assert [(r.file, r.begin, r.end, r.digest) for r in parallel] == \
        [(r.file, r.begin, r.end, r.digest) for r in serial]
    assert [f.path for f in parallel_files] == [f"{name}.safetensors" for name in tasks]
    for written in parallel_files:
        data = (tmp_path / "parallel" / written.path).read_bytes()
        assert written.sha256 == hashlib.sha256(data).hexdigest()
        assert data == (tmp_path / "serial" / written.path).read_bytes()


def test_a_steps_large_files_are_written_at_once_whatever_the_cores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    converter = Converter(chunk_bytes=4096)
    # The four files meet inside their writes: none waits for another to be done.
    meeting = threading.Barrier(4, timeout=30)
    real = Converter._write_one

    def write_one(self, task, root, cancel):  # type: ignore[no-untyped-def]
        meeting.wait()
        return real(self, task, root, cancel)

    monkeypatch.setattr(Converter, "_write_one", write_one)
    names = ("model", "master", "exp_avg", "exp_avg_sq")
    records = converter.write_files(
        [FileTask(tmp_path / f"{name}.safetensors", _jobs(name, [5000])) for name in names],
        tmp_path)
    assert [r.file for r in records] == [f"{name}.safetensors" for name in names]


def test_a_failing_file_stops_the_others_and_leaves_nothing(tmp_path: Path) -> None:
    failed = threading.Event()

    def broken(max_bytes: int):
        yield torch.zeros(10)
        failed.set()
        raise ExporterError("disk on fire")

    def going_on(max_bytes: int):  # still being written when the other file fails
        yield np.zeros(256, dtype=np.float32)
        assert failed.wait(30)
        for _ in range(999):
            yield np.zeros(256, dtype=np.float32)

    tasks = [FileTask(tmp_path / "ok.safetensors",
                      [TensorJob("a", "master", torch.float32, (256_000,), going_on)]),
             FileTask(tmp_path / "bad.safetensors",
                      [TensorJob("b", "master", torch.float32, (100,), broken)])]
    with pytest.raises(ExporterError, match="disk on fire"):
        Converter(chunk_bytes=1024, workers=2).write_files(tasks, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_files_at_once_follow_the_cores_this_process_may_run_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A container's cpuset or taskset leaves the process 6, then 2, of the machine's 64 cores:
    # one file thread per core it may run on (at least FILES_AT_ONCE), not one per core there is.
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert Converter().workers == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert Converter().workers == FILES_AT_ONCE == 4
    assert Converter(workers=1).workers == 1


def test_without_statistics_the_index_columns_are_null(tmp_path: Path) -> None:
    records = Converter(statistics=False).write_file(
        tmp_path / "f.safetensors", _jobs("a", [1000]), tmp_path)
    assert set(records[0].stats.as_dict().values()) == {None}
    assert records[0].digest == blake3.blake3((tmp_path / "f.safetensors").read_bytes()[
        records[0].begin : records[0].end]).hexdigest()


def test_export_without_statistics_writes_the_same_files(tmp_path: Path) -> None:
    source = tmp_path / "ckpt"
    write_checkpoint(source, TINY, step=8, dp=2)
    full = export_checkpoint(source, tmp_path / "full", ExportOptions())
    bare = export_checkpoint(source, tmp_path / "bare", ExportOptions(statistics=False))
    assert bare.file_sha256 == full.file_sha256
    assert all(r.stats.nan_count is None and r.stats.mean is None for r in bare.records)
    assert all(r.stats.nan_count is not None for r in full.records)


def test_flat_layout_covering_equals_a_scan(tmp_path: Path) -> None:
    sizes = [0, 5, 1, 0, 7, 3, 0, 11, 2]
    torch.save({"parts": [torch.arange(n, dtype=torch.float32) for n in sizes]}, tmp_path / "p.pt")
    refs = load_torch_file(tmp_path / "p.pt").obj["parts"]
    layout = FlatLayout([(ref, 0, ref.numel) for ref in refs])
    total = sum(sizes)
    rng = random.Random(0)
    for _ in range(200):
        begin = rng.randrange(total)
        count = rng.randrange(total - begin + 1)
        got = layout.covering(begin, count, "parts")
        assert sum(s.count for s in got) == count
        assert all(s.count > 0 for s in got)
        flat = np.concatenate([r.read_array() for r in refs])
        read = np.concatenate([s.read() for s in got]) if got else np.empty(0, np.float32)
        assert np.array_equal(read, flat[begin : begin + count])
    with pytest.raises(Exception, match="past the last partition"):
        layout.covering(total - 1, 2, "parts")
    # Segments of many-interval files stay small: tuples, made as they are iterated.
    segment = next(iter(layout.covering(0, total, "parts")))
    assert isinstance(segment, Segment) and not hasattr(segment, "__dict__")


def test_many_comm_intervals_export_the_bytes_of_one_interval(tmp_path: Path) -> None:
    # Same seed and shape, so the same values: only DeeperSpeed's bucket differs (thousands of
    # comm intervals, parameters spread over many small partition tensors on both ranks).
    one = tmp_path / "one"
    many = tmp_path / "many"
    write_checkpoint(one, TINY, step=8, dp=2)
    truth = write_checkpoint(many, TINY, step=8, dp=2, config=RunConfig(max_elements_per_comm=64))
    assert sum(p.num_comm_intervals for p in truth.partitions[0]) > 100
    options = ExportOptions(include=("model", "optimizer"))
    a = export_checkpoint(one, tmp_path / "a", options)
    b = export_checkpoint(many, tmp_path / "b", options)
    for rel in ("optimizer/master.safetensors", "optimizer/exp_avg.safetensors",
                "optimizer/exp_avg_sq.safetensors", "model.safetensors"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert [r.digest for r in a.records] == [r.digest for r in b.records]


def test_gathered_chunks_are_full_whatever_the_segment_size(tmp_path: Path) -> None:
    from exporter.neox.checkpoint import scan_checkpoint
    from exporter.neox.config import load_neox_config
    from exporter.neox.model import plan_model
    from exporter.neox.state import read_engine_state
    from exporter.neox.zero import plan_optimizer

    write_checkpoint(tmp_path, TINY, step=8, dp=2, config=RunConfig(max_elements_per_comm=64))
    files = scan_checkpoint(tmp_path)
    model = plan_model(files, load_neox_config(files.configs))
    plan = plan_optimizer(files, model, read_engine_state(files, exported_module=True))
    assert plan is not None
    param = max(plan.units[0], key=lambda p: len(p.segments["master"]))
    assert len(param.segments["master"]) > 20
    chunks = list(param.chunks("master")(256))
    assert [c.size for c in chunks[:-1]] == [64] * (len(chunks) - 1)
    assert np.array_equal(np.concatenate(chunks).reshape(param.shape), param.read("master"))


def test_reading_a_torch_file_restores_the_garbage_collector(tmp_path: Path) -> None:
    import gc

    torch.save({"w": torch.zeros(3)}, tmp_path / "ok.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert gc.isenabled()
    load_torch_file(tmp_path / "ok.pt")
    assert gc.isenabled()
    with pytest.raises(ExporterError):
        load_torch_file(tmp_path / "bad.pt")
    assert gc.isenabled()
    gc.disable()
    try:
        load_torch_file(tmp_path / "ok.pt")
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


def test_the_sample_command_writes_many_comm_intervals_on_request(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from exporter.cli import cli

    result = CliRunner().invoke(cli, ["sample", str(tmp_path), "--steps", "2", "--dp", "2",
                                      "--bucket-elements", "64"])
    assert result.exit_code == 0, result.output
    optim = load_torch_file(tmp_path / "step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert sum(optim.obj["optimizer_state_dict"]["num_comm_intervals_per_group"]) > 100


def test_an_index_of_old_and_new_steps_reads_as_one_table(tmp_path: Path) -> None:
    from exporter.archive.index import read_index, tensor_rows, write_tensor_index
    from exporter.records import TensorStats, WrittenRecord

    job = _jobs("w", [4])[0]
    record = WrittenRecord(job, "f.safetensors", torch.float32, 0, 16, "ab" * 32,
                           TensorStats(0.0, 1.0, 0.5, 0.1, 1.0, 1.0, 0, 0, 0))
    folder = tmp_path / "index" / "tensors"
    write_tensor_index(folder / "step2.parquet", tensor_rows(2, [record], "steps/step2"))
    new = pq.read_table(folder / "step2.parquet")
    old = tensor_rows(1, [record], "steps/step1")[0]
    old["sha256"] = old.pop("digest")
    del old["digest_algorithm"]
    schema = pa.schema([f if f.name != "digest" else pa.field("sha256", pa.string(), False)
                        for f in new.schema if f.name != "digest_algorithm"])
    pq.write_table(pa.Table.from_pylist([old], schema=schema), folder / "step1.parquet")
    rows = read_index(folder).to_pylist()
    assert [index_digest(r) for r in rows] == [("sha256", "ab" * 32), ("blake3", "ab" * 32)]


def _expand_runs(value: object) -> object:
    if isinstance(value, dict) and set(value) == {"__runs__"}:
        return [_expand_runs(item) for count, item in value["__runs__"] for _ in range(count)]
    if isinstance(value, dict):
        return {k: _expand_runs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_runs(v) for v in value]
    return value


def test_many_interval_state_json_keeps_every_value_in_runs(tmp_path: Path) -> None:
    import json

    from exporter.torchfile import to_json

    source = tmp_path / "many"
    write_checkpoint(source, TINY, step=8, dp=2, config=RunConfig(max_elements_per_comm=64))
    export_checkpoint(source, tmp_path / "out", ExportOptions(include=("optimizer", "state")))
    files = json.loads((tmp_path / "out" / "state.json").read_text())["optimizer"]["files"]
    assert sorted(files) == sorted(p.name for p in source.glob("zero_pp_rank_*"))
    for name, rendered in files.items():
        text = json.dumps(rendered)
        assert text.count('"__runs__"') > 0
        full = to_json(load_torch_file(source / name).obj, tensor=lambda r: {
            "__partition__": str(r.dtype).removeprefix("torch."), "numel": r.numel})
        assert _expand_runs(rendered) == full
        assert len(text) * 4 < len(json.dumps(full))


def test_model_files_are_written_while_the_optimizer_is_planned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from exporter.pipeline import export as export_module

    write_checkpoint(tmp_path / "src", TINY, step=8, dp=2)
    real = export_module.plan_optimizer
    seen: list[bool] = []

    def waiting(files, model, engine, **kwargs):  # type: ignore[no-untyped-def]
        weights = tmp_path / "out.partial" / "model.safetensors"
        deadline = time.monotonic() + 30
        while not weights.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(weights.exists())
        return real(files, model, engine, **kwargs)

    monkeypatch.setattr(export_module, "plan_optimizer", waiting)
    monkeypatch.setattr(export_module, "partial_dir", lambda out: tmp_path / "out.partial")
    result = export_checkpoint(tmp_path / "src", tmp_path / "out", ExportOptions())
    assert seen == [True]
    kinds = [r.job.kind for r in result.records]
    assert kinds.index("master") > kinds.index("model")  # records keep the file order
    twin = export_checkpoint(tmp_path / "src", tmp_path / "twin", ExportOptions())
    assert result.file_sha256 == twin.file_sha256


def test_a_planning_failure_stops_the_model_files_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.pipeline import export as export_module

    write_checkpoint(tmp_path / "src", TINY, step=8, dp=2)

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ExporterError("partition files disagree")

    monkeypatch.setattr(export_module, "plan_optimizer", failing)
    with pytest.raises(ExporterError, match="partition files disagree"):
        export_checkpoint(tmp_path / "src", tmp_path / "out", ExportOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
