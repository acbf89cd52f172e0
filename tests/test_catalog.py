"""Many runs, one catalog: three tiny runs that differ only in seed, side by side."""

from __future__ import annotations

import doctest
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

import exporter.catalog.build as catalog_build
from exporter import open_archive, open_catalog
from exporter.archive.schema import schema_to_json
from exporter.catalog import build_catalog
from exporter.catalog.compare import compare_runs
from exporter.catalog.deltas import compute_deltas
from exporter.catalog.members import parse_override, run_metadata
from exporter.catalog.plot import bands, run_curves
from exporter.catalog.schema import SCHEMA_FILES, schema_differences
from exporter.cli.main import cli
from exporter.errors import CatalogError
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource

STEPS = (0, 1, 2, 4)
SEEDS = (1, 2, 3)
DENSE = "layers.*.attention.dense.weight"
SCHEMAS = Path(__file__).parent.parent / "schemas"
MODEL_ONLY = BuildOptions(quiet=True, export=ExportOptions(include=("model", "state")))


def make_archive(base: Path, seed: int, steps: tuple[int, ...] = STEPS) -> Path:
    """``base/runs/seed{N}`` trained with ``seed``, built into ``base/archives/seed{N}``."""
    run = base / "runs" / f"seed{seed}"
    write_run(run, TINY, steps=steps, dp=1, seed=seed, config=tiny_run_config(steps[-1]))
    out = base / "archives" / f"seed{seed}"
    build(LocalSource(run), out, MODEL_ONLY)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Archives of the tiny run trained with seeds 1, 2, 3 (and 4, kept aside)."""
    folder = tmp_path_factory.mktemp("seeds")
    for seed in (*SEEDS, 4):
        make_archive(folder, seed)
    return folder


@pytest.fixture
def work(base: Path, tmp_path: Path) -> Path:
    """A private copy of the archives (tests delete, rebuild and write into them)."""
    shutil.copytree(base / "archives", tmp_path / "archives")
    return tmp_path


def archives(root: Path, seeds: tuple[int, ...] = SEEDS) -> list[str]:
    return [str(root / "archives" / f"seed{s}") for s in seeds]


def member_rows(root: Path, seed: int, stat: str, match: str, kind: str = "model") -> list[tuple]:
    """What a run's own archive index says, filtered as ``stats`` filters."""
    from exporter.archive.plot import name_matches

    index = open_archive(root / "archives" / f"seed{seed}").index.to_table()
    return [(f"seed{seed}", r["step"], r["kind"], r["name"], r["layer"], r[stat])
            for r in index.to_pylist() if r["kind"] == kind and name_matches(r["name"], match)]


def stats_rows(table: pa.Table, stat: str) -> list[tuple]:
    return list(zip(*(table[c].to_pylist() for c in ("run", "step", "kind", "name", "layer", stat)),
                    strict=True))


# -- samples --------------------------------------------------------------------------------

def test_sample_seed_trains_different_weights_and_is_in_the_config(base: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["sample", str(tmp_path / "r"), "--steps", "0,1", "--dp", "1",
                                      "--seed", "5"])
    assert result.exit_code == 0, result.output
    config = next((tmp_path / "r" / "step1").glob("*.yml"))
    assert yaml.safe_load(config.read_text())["seed"] == 5
    name = "gpt_neox.layers.0.attention.dense.weight"
    one, two = (open_archive(base / "archives" / f"seed{s}").tensor(STEPS[-1], name) for s in (1, 2))
    assert not torch.equal(one, two)


# -- building ---------------------------------------------------------------------------------

def test_run_table_takes_seed_from_the_config_and_size_from_the_index(work: Path) -> None:
    update = build_catalog(work / "catalog", archives(work))

    runs = open_catalog(work / "catalog").runs.to_pylist()
    assert update.added == ["seed1", "seed2", "seed3"]
    assert [r["run"] for r in runs] == ["seed1", "seed2", "seed3"]
    assert [r["seed"] for r in runs] == [1, 2, 3]
    assert {r["variant"] for r in runs} == {"standard"}
    parameters = sum(t.numel() for t in open_archive(archives(work)[0]).state_dict(0).values())
    assert runs[0]["parameters"] == parameters
    assert {r["model_size"] for r in runs} == {f"{parameters / 1e3:.0f}k"}
    assert [r["archive"] for r in runs] == archives(work)
    assert [r["steps"] for r in runs] == [len(STEPS)] * 3 and runs[0]["revision"] is None
    steps = open_catalog(work / "catalog").checkpoints().select(["run", "step", "iteration"])
    assert steps.to_pylist() == [
        {"run": f"seed{s}", "step": r["step"], "iteration": r["iteration"]}
        for s in SEEDS for r in open_archive(work / "archives" / f"seed{s}").checkpoints.to_pylist()]


def test_polypythias_names_give_size_seed_and_variant() -> None:
    assert run_metadata("410m-seed8", "hf://EleutherAI/neox-ckpt-pythia-410m-seed8", {}, None) == {
        "model_size": "410m", "seed": 8, "variant": "standard"}
    assert run_metadata("160m-data-seed3", "", {"seed": 1234}, None) == {
        "model_size": "160m", "seed": 3, "variant": "data-seed"}
    assert run_metadata("160m-weight-seed2", "", {}, None)["variant"] == "weight-seed"
    assert run_metadata("1.4b", "", {"seed": 1234}, 1_414_647_808) == {
        "model_size": "1.4b", "seed": 1234, "variant": "standard"}
    assert run_metadata("tiny", "", {}, 405_334_016)["model_size"] == "405m"


def test_stats_across_runs_equal_the_union_of_the_member_indexes(work: Path) -> None:
    build_catalog(work / "catalog", archives(work))
    catalog = open_catalog(work / "catalog")

    for stat, match in (("l2", DENSE), ("mean", "*"), ("zero_count", "final_layer_norm.*")):
        got = stats_rows(catalog.stats(match, "model", stat), stat)
        expected = [row for seed in SEEDS for row in member_rows(work, seed, stat, match)]
        assert got == expected, (stat, match)
        assert len(got) > 0
    some = catalog.stats(DENSE, runs=["seed3", "seed1"], steps=[2, 4])
    assert set(some["run"].to_pylist()) == {"seed1", "seed3"}
    assert set(some["step"].to_pylist()) == {2, 4}
    with pytest.raises(CatalogError, match="no run 'seed9'"):
        catalog.stats(DENSE, runs=["seed9"])


def test_adding_a_fourth_run_reads_only_that_runs_index(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_catalog(work / "catalog", archives(work))
    read = []
    original = catalog_build.read_member
    monkeypatch.setattr(catalog_build, "read_member",
                        lambda archive, label: read.append(label) or original(archive, label))

    update = build_catalog(work / "catalog", archives(work, (*SEEDS, 4)))

    assert read == [str(work / "archives" / "seed4")]
    assert update.added == ["seed4"] and update.unchanged == ["seed1", "seed2", "seed3"]
    rows = stats_rows(open_catalog(work / "catalog").stats(DENSE), "l2")
    assert rows == [r for s in (*SEEDS, 4) for r in member_rows(work, s, "l2", DENSE)]


def test_a_run_whose_archive_changed_is_reindexed(base: Path, tmp_path: Path) -> None:
    run = base / "runs" / "seed1"
    archive = tmp_path / "archives" / "seed1"
    build(LocalSource(run), archive, BuildOptions(quiet=True, steps="0,1",
                                                  export=MODEL_ONLY.export))
    build_catalog(tmp_path / "catalog", [str(archive)])
    assert open_catalog(tmp_path / "catalog").runs["steps"].to_pylist() == [2]

    build(LocalSource(run), archive, MODEL_ONLY)
    update = build_catalog(tmp_path / "catalog", [str(archive)])

    assert update.reindexed == ["seed1"]
    catalog = open_catalog(tmp_path / "catalog")
    assert catalog.runs["steps"].to_pylist() == [len(STEPS)]
    assert sorted(set(catalog.stats(DENSE)["step"].to_pylist())) == list(STEPS)


def test_a_member_with_another_schema_is_refused_with_the_reason(work: Path) -> None:
    odd = work / "archives" / "seed2"
    for shard in (odd / "index" / "tensors").glob("*.parquet"):
        pq.write_table(pq.read_table(shard).drop_columns(["l2"]), shard)
    build_catalog(work / "catalog", archives(work, (1,)))

    update = build_catalog(work / "catalog", [str(odd)])
    result = CliRunner().invoke(cli, ["catalog", str(odd), "--out", str(work / "catalog")])

    assert update.added == [] and "no column 'l2'" in update.failed[str(odd)]
    assert "refused" in update.failed[str(odd)]
    assert result.exit_code == 1 and "no column 'l2'" in str(result.exception)
    assert open_catalog(work / "catalog").run_names == ["seed1"]


def test_schema_differences_name_each_column() -> None:
    want = pa.schema([("a", pa.int64()), ("b", pa.float64())])
    assert schema_differences(pa.schema([("a", pa.int32()), ("c", pa.string())]), want) == [
        "no column 'b'", "column 'a' is int32, expected int64", "unexpected column 'c'"]
    assert schema_differences(want, want) == []


def test_an_unreachable_member_still_answers_from_the_catalog(work: Path) -> None:
    build_catalog(work / "catalog", archives(work))
    before = open_catalog(work / "catalog").stats(DENSE)
    shutil.rmtree(work / "archives" / "seed2")

    catalog = open_catalog(work / "catalog")
    update = build_catalog(work / "catalog", refresh=True)

    assert catalog.stats(DENSE).equals(before)
    assert list(catalog.unreachable()) == ["seed2"]
    with pytest.raises(CatalogError, match="run seed2: its archive .*seed2 cannot be read"):
        catalog.run("seed2")
    assert catalog.run("seed1").steps == list(STEPS)
    assert list(update.unreachable) == ["seed2"] and update.unchanged == ["seed1", "seed3"]
    assert open_catalog(work / "catalog").stats(DENSE).equals(before)


def test_overrides_rename_and_relabel_runs_and_survive_reindexing(work: Path) -> None:
    result = CliRunner().invoke(cli, ["catalog", *archives(work), "--out", str(work / "catalog"),
                                      "--run", "seed1=variant=data-seed,seed=11",
                                      "--run", "seed3=run=third"])
    assert result.exit_code == 0, result.output
    runs = {r["run"]: r for r in open_catalog(work / "catalog").runs.to_pylist()}
    assert set(runs) == {"seed1", "seed2", "third"}
    assert (runs["seed1"]["variant"], runs["seed1"]["seed"]) == ("data-seed", 11)

    assert build_catalog(work / "catalog", overrides={"seed2": {"seed": 22}}).relabelled == ["seed2"]
    assert build_catalog(work / "catalog", overrides={"seed2": {"seed": 22}}).relabelled == []
    (work / "archives" / "seed1" / "manifest.json").write_text(
        (work / "archives" / "seed1" / "manifest.json").read_text() + "\n")
    update = build_catalog(work / "catalog", archives(work, (1,)))

    catalog = open_catalog(work / "catalog")
    assert update.reindexed == ["seed1"]
    assert dict(zip(catalog.runs["run"].to_pylist(), catalog.runs["seed"].to_pylist(), strict=True)) == {
        "seed1": 11, "seed2": 22, "third": 3}
    assert set(catalog.stats(DENSE, runs=["seed2"])["seed"].to_pylist()) == {22}
    assert set(catalog.stats(DENSE, runs=["seed1"])["variant"].to_pylist()) == {"data-seed"}
    assert parse_override("a=seed=1") == ("a", {"seed": 1})
    for bad in ("a", "a=colour=red", "a=seed=x", "a=run=bad/name"):
        with pytest.raises(CatalogError):
            parse_override(bad)


def test_a_folder_that_is_no_catalog_is_not_overwritten(work: Path) -> None:
    with pytest.raises(CatalogError, match="not a catalog"):
        build_catalog(work / "archives" / "seed1", archives(work, (2,)))
    with pytest.raises(CatalogError, match="not a catalog"):
        open_catalog(work / "archives")


# -- compare and deltas -------------------------------------------------------------------------

def test_compare_a_run_with_itself_gives_cosine_one_and_distance_zero(work: Path) -> None:
    build_catalog(work / "catalog", archives(work))
    catalog = open_catalog(work / "catalog")

    table = pq.read_table(compare_runs(catalog, "seed1", "seed1").path).to_pylist()

    assert len(table) == sum(1 for r in open_archive(archives(work)[0]).index.to_table().to_pylist()
                             if r["kind"] == "model")
    assert {r["l2_distance"] for r in table} == {0.0} and {r["relative_l2"] for r in table} == {0.0}
    nonzero = [r for r in table if r["l2_a"] > 0]
    assert nonzero and all(r["cosine"] == pytest.approx(1.0, abs=1e-12) for r in nonzero)


def test_compare_two_seeds_equals_a_direct_computation(work: Path) -> None:
    build_catalog(work / "catalog", archives(work))
    result = CliRunner().invoke(cli, ["compare", str(work / "catalog"), "--runs", "seed1,seed2",
                                      "--match", DENSE, "--steps", "0,4"])
    assert result.exit_code == 0, result.output
    path = work / "catalog" / "index" / "compare" / "seed1__seed2__model.parquet"
    rows = pq.read_table(path).to_pylist()
    a, b = (open_archive(p) for p in archives(work, (1, 2)))

    assert {r["step"] for r in rows} == {0, 4} and len(rows) == 2 * TINY.num_layers
    for r in rows:
        x = a.tensor(r["step"], r["name"]).double().flatten()
        y = b.tensor(r["step"], r["name"]).double().flatten()
        assert r["cosine"] == pytest.approx(float(x @ y / (x.norm() * y.norm())), rel=1e-12)
        assert r["relative_l2"] == pytest.approx(float((x - y).norm() / x.norm()), rel=1e-12)
        assert r["cosine"] < 0.5  # different seeds: different weights
    card = (work / "catalog" / "README.md").read_text()
    assert "(index/compare/seed1__seed2__model.parquet)" in card
    assert "config_name: compare" in card


def test_deltas_equal_a_direct_computation_from_the_two_steps(work: Path) -> None:
    root = work / "archives" / "seed1"
    result = CliRunner().invoke(cli, ["deltas", str(root)])
    assert result.exit_code == 0, result.output
    archive = open_archive(root)

    for previous, step in zip(STEPS, STEPS[1:], strict=False):
        rows = pq.read_table(root / "index" / "deltas" / f"step{step}.parquet").to_pylist()
        assert len(rows) == len(archive.state_dict(step)) and rows
        for r in rows:
            before = archive.tensor(previous, r["name"]).double()
            after = archive.tensor(step, r["name"]).double()
            assert r["previous_step"] == previous
            assert r["update_l2"] == pytest.approx(float((after - before).norm()), rel=1e-12, abs=0)
            assert r["weight_l2"] == pytest.approx(float(before.norm()), rel=1e-12, abs=0)
            if r["weight_l2"]:
                assert r["ratio"] == pytest.approx(r["update_l2"] / r["weight_l2"], rel=1e-12)
    assert compute_deltas(root).kept == list(STEPS[1:])
    wider = compute_deltas(root, kinds=("model", "buffer"), match="layers.0.*")
    assert wider.written == list(STEPS[1:])
    shard = pq.read_table(root / "index" / "deltas" / f"step{STEPS[-1]}.parquet")
    buffers = [n for k, n in zip(shard["kind"].to_pylist(), shard["name"].to_pylist(), strict=True)
               if k == "buffer"]
    assert buffers and all(".layers.0." in n for n in buffers)
    assert len(shard) == len(archive.state_dict(STEPS[-1])) + len(buffers)  # model rows kept
    assert wider.rows == len(buffers) * (len(STEPS) - 1)
    with pytest.raises(CatalogError, match="--kind 'weights'"):
        compute_deltas(root, kinds=("weights",))


# -- plots, card, schemas -----------------------------------------------------------------------

def test_band_is_the_mean_min_and_max_across_seeds(work: Path) -> None:
    build_catalog(work / "catalog", archives(work))
    catalog = open_catalog(work / "catalog")
    stats = catalog.stats("layers.0.attention.dense.weight")

    (band,) = bands(run_curves(stats, "l2"), "seed")

    assert band.runs == ("seed1", "seed2", "seed3") and band.steps == STEPS
    for i, step in enumerate(STEPS):
        values = stats.filter(pc.equal(stats["step"], step))["l2"].to_pylist()
        assert band.low[i] == min(values) and band.high[i] == max(values)
        assert band.mean[i] == pytest.approx(sum(values) / 3)
    for extra in ([], ["--band"]):
        out = work / f"plot{len(extra)}.png"
        result = CliRunner().invoke(cli, ["plot", str(work / "catalog"), "--stat", "l2", "--match",
                                          DENSE, "--group-by", "seed", *extra, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_lists_runs_with_configs_and_plots(work: Path) -> None:
    build_catalog(work / "catalog", archives(work))
    text = (work / "catalog" / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])

    assert [c["config_name"] for c in front["configs"]] == ["runs", "tensors", "checkpoints"]
    assert all(f"| seed{s} |" in text for s in SEEDS)
    for plot in ("assets/seeds_l2.png", "assets/seeds_l2_band.png"):
        assert f"]({plot})" in text and (work / "catalog" / plot).is_file()


def test_written_catalog_tables_follow_the_committed_schemas(work: Path) -> None:
    build_catalog(work / "catalog", archives(work))
    compare_runs(open_catalog(work / "catalog"), "seed1", "seed2")
    compute_deltas(work / "archives" / "seed1")
    written = {
        "catalog_runs.schema.json": [work / "catalog" / "index" / "runs.parquet"],
        "catalog_tensors.schema.json": list((work / "catalog" / "index" / "tensors").glob("*")),
        "catalog_checkpoints.schema.json": list((work / "catalog" / "index" / "checkpoints").glob("*")),
        "catalog_compare.schema.json": list((work / "catalog" / "index" / "compare").glob("*")),
        "deltas.schema.json": list((work / "archives" / "seed1" / "index" / "deltas").glob("*")),
    }
    for file, schema in SCHEMA_FILES.items():
        committed = json.loads((SCHEMAS / file).read_text())
        assert schema_to_json(schema) == committed, file
        assert written[file], file
        for shard in written[file]:
            assert pq.read_schema(shard).equals(schema, check_metadata=False), shard
            pq.read_table(shard).validate(full=True)


def test_library_examples_run(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.catalog.build as b
    import exporter.catalog.compare as c
    import exporter.catalog.deltas as d
    import exporter.catalog.plot as p
    import exporter.catalog.reader as r

    shutil.copytree(base / "archives", tmp_path / "archives")
    shutil.copytree(tmp_path / "archives" / "seed1", tmp_path / "archive")
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for module in (b, r, c, p, d):
        for test in doctest.DocTestFinder().find(module, module.__name__):
            runner.run(test)
    assert runner.tries >= 12 and runner.failures == 0
