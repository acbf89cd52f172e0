"""Archive builds over a sample run: layout, schemas, resume, parallel and Ray executors."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from exporter.archive.schema import (
    CHECKPOINT_SCHEMA,
    MANIFEST_SCHEMA,
    TENSOR_SCHEMA,
    schema_to_json,
)
from exporter.errors import ExporterError
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.run import BuildOptions, build, step_complete
from exporter.pipeline.steps import parse_steps
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource

SCHEMAS = Path(__file__).parent.parent / "schemas"
STEPS = (0, 1, 2, 4, 8)
TIMING = {"seconds"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    write_run(folder, TINY, steps=STEPS, dp=2, config=tiny_run_config(STEPS[-1]))
    return folder


@pytest.fixture(scope="module")
def archive(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("archive") / "a"
    summary = build(LocalSource(run), out, BuildOptions(quiet=True))
    assert summary.count("done") == len(STEPS)
    return out


def _rows(root: Path, table: str) -> list[dict]:
    rows = pq.read_table(root / "index" / table).to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in rows),
                  key=lambda r: (r["step"], r.get("kind", ""), r.get("name", "")))


def test_layout_matches_the_design(archive: Path) -> None:
    for step in STEPS:
        folder = archive / "steps" / f"step{step}"
        for name in ("config.json", "model.safetensors", "state.json", "neox.yml",
                     "optimizer/master.safetensors", "optimizer/exp_avg.safetensors",
                     "optimizer/exp_avg_sq.safetensors"):
            assert (folder / name).is_file(), (step, name)
        assert (archive / "index" / "tensors" / f"step{step}.parquet").is_file()
        assert (archive / "index" / "checkpoints" / f"step{step}.parquet").is_file()


def test_written_tables_and_manifest_follow_the_committed_schemas(archive: Path) -> None:
    for table, schema, file in (("tensors", TENSOR_SCHEMA, "tensors.schema.json"),
                                ("checkpoints", CHECKPOINT_SCHEMA, "checkpoints.schema.json")):
        committed = json.loads((SCHEMAS / file).read_text())
        assert schema_to_json(schema) == committed
        for shard in (archive / "index" / table).glob("*.parquet"):
            written = pq.read_schema(shard)
            assert written.equals(schema, check_metadata=False), shard
            pq.read_table(shard).validate(full=True)
    committed_manifest = json.loads((SCHEMAS / "manifest.schema.json").read_text())
    assert committed_manifest == MANIFEST_SCHEMA
    jsonschema.validate(json.loads((archive / "manifest.json").read_text()), committed_manifest)


def test_index_rows_describe_the_written_bytes(archive: Path) -> None:
    import blake3

    rows = pq.read_table(archive / "index" / "tensors").to_pylist()
    assert {r["kind"] for r in rows} == {"model", "buffer", "master", "exp_avg", "exp_avg_sq", "state"}
    for r in rows[:200]:
        with open(archive / r["file"], "rb") as fh:
            fh.seek(r["data_offset_begin"])
            data = fh.read(r["data_offset_end"] - r["data_offset_begin"])
        assert r["digest_algorithm"] == "blake3"
        assert blake3.blake3(data).hexdigest() == r["digest"]
    ck = pq.read_table(archive / "index" / "checkpoints").to_pylist()
    assert [r["step"] for r in sorted(ck, key=lambda r: r["step"])] == list(STEPS)
    assert all(r["format"] == "deeperspeed-elastic-stage1" and r["dp_size"] == 2 for r in ck)


def test_index_loads_with_datasets_pandas_and_pyarrow_dataset(archive: Path) -> None:
    import datasets

    files = sorted(str(p) for p in (archive / "index" / "tensors").glob("*.parquet"))
    dset = datasets.load_dataset("parquet", data_files=files, split="train")
    frame = pq.read_table(archive / "index" / "tensors").to_pandas()
    table = ds.dataset(archive / "index" / "tensors", format="parquet").to_table()
    assert len(dset) == len(frame) == table.num_rows > 0
    assert set(dset.column_names) == set(TENSOR_SCHEMA.names)


def test_rerun_skips_complete_steps_and_redoes_damaged_ones(run: Path, archive: Path, tmp_path) -> None:
    import shutil

    copy = tmp_path / "a"
    shutil.copytree(archive, copy)
    before = _rows(copy, "tensors")
    victim = copy / "steps" / "step2" / "optimizer" / "exp_avg.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert not step_complete(copy, 2)
    (copy / "index" / "checkpoints" / "step4.parquet").unlink()
    summary = build(LocalSource(run), copy, BuildOptions(quiet=True))
    assert {o.step for o in summary.outcomes if o.status == "done"} == {2, 4}
    assert {o.step for o in summary.outcomes if o.status == "skipped"} == {0, 1, 8}
    assert _rows(copy, "tensors") == before


def test_parallel_workers_build_the_same_archive(run: Path, archive: Path, tmp_path: Path) -> None:
    build(LocalSource(run), tmp_path / "p", BuildOptions(workers=2, quiet=True))
    assert _rows(tmp_path / "p", "tensors") == _rows(archive, "tensors")


@pytest.mark.ray
def test_ray_executor_builds_the_same_archive(run: Path, archive: Path, tmp_path: Path) -> None:
    build(LocalSource(run), tmp_path / "r",
          BuildOptions(executor="ray", workers=2, steps="0,8", quiet=True))
    expected = [r for r in _rows(archive, "tensors") if r["step"] in (0, 8)]
    assert _rows(tmp_path / "r", "tensors") == expected


def test_options_change_is_refused_on_an_existing_archive(run: Path, archive: Path, tmp_path) -> None:
    import shutil

    copy = tmp_path / "a"
    shutil.copytree(archive, copy)
    with pytest.raises(ExporterError, match="options"):
        build(LocalSource(run), copy, BuildOptions(export=ExportOptions(include=("model",)), quiet=True))


@pytest.mark.parametrize(
    "spec, expected",
    [("all", [0, 1, 2, 4, 8, 1000, 3000]), ("log", [0, 1, 2, 4, 8]), ("1000:3000:1000", [1000, 3000]),
     ("2,8", [2, 8]), (":4", [0, 1, 2, 4]), ("log,3000", [0, 1, 2, 4, 8, 3000])],
)
def test_step_selection(spec: str, expected: list[int]) -> None:
    assert parse_steps(spec, [0, 1, 2, 4, 8, 1000, 3000]) == expected


def test_step_selection_names_what_is_wrong() -> None:
    with pytest.raises(ExporterError, match="not in the source"):
        parse_steps("5", [0, 1])
    with pytest.raises(ExporterError, match="cannot read"):
        parse_steps("x:y", [0, 1])


def test_tables_are_arrow_native(archive: Path) -> None:
    table = pq.read_table(archive / "index" / "tensors")
    assert table.schema.field("shape").type == pa.list_(pa.int64())


def test_compressed_archive_reads_back_the_same_tensors(run: Path, archive: Path, tmp_path: Path) -> None:
    from exporter import open_archive
    from exporter.verify import verify_path

    out = tmp_path / "z"
    build(LocalSource(run), out, BuildOptions(export=ExportOptions(compress_level=3), steps="8",
                                               quiet=True))
    assert not list(out.rglob("*.safetensors"))
    plain, packed = open_archive(archive), open_archive(out)
    for kind in ("model", "master", "exp_avg", "exp_avg_sq"):
        a, b = plain.state_dict(8, kind), packed.state_dict(8, kind)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a), kind
    assert _rows(out, "tensors") == [
        {**r, "file": r["file"] + ".zst"} for r in _rows(archive, "tensors") if r["step"] == 8]
    assert all(r.ok for r in verify_path(out))
    jsonschema.validate(json.loads((out / "manifest.json").read_text()), MANIFEST_SCHEMA)
