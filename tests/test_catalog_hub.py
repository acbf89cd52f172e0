"""A catalog of Hub archives, published on the Hub: the real huggingface_hub client against
``hub_server``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hubserver import HubServer
from huggingface_hub import HfApi
from test_catalog import DENSE, SEEDS, STEPS, make_archive, member_rows, stats_rows

from exporter import open_archive, open_catalog
from exporter.catalog import build_catalog
from exporter.cli.main import cli
from exporter.hub.calls import RetryPolicy
from exporter.hub.push import push_archive

NO_WAIT = RetryPolicy(attempts=3, base_delay=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub-seeds")
    for seed in SEEDS:
        make_archive(folder, seed)
    return folder


def push_members(base: Path, tmp_path: Path) -> list[str]:
    import shutil

    members = []
    for seed in SEEDS:
        copy = shutil.copytree(base / "archives" / f"seed{seed}", tmp_path / f"seed{seed}")
        push_archive(copy, f"neox/seed{seed}", retry=NO_WAIT)
        members.append(f"hf://datasets/neox/seed{seed}")
    return members


def test_catalog_of_hub_archives_pushed_to_the_hub_answers_like_its_members(
    hub_server: HubServer, base: Path, tmp_path: Path
) -> None:
    members = push_members(base, tmp_path)

    result = CliRunner().invoke(cli, ["catalog", *members, "--out", str(tmp_path / "catalog"),
                                      "--push-to", "neox/seeds"])

    assert result.exit_code == 0, result.output
    local = open_catalog(tmp_path / "catalog")
    runs = local.runs.to_pylist()
    assert [r["run"] for r in runs] == ["seed1", "seed2", "seed3"]
    assert [r["seed"] for r in runs] == list(SEEDS)
    assert [r["revision"] for r in runs] == [hub_server.head(f"neox/seed{s}", repo_type="dataset")
                                            for s in SEEDS]
    expected = [row for s in SEEDS for row in member_rows(base, s, "l2", DENSE)]
    assert stats_rows(local.stats(DENSE), "l2") == expected
    remote = open_catalog("hf://datasets/neox/seeds")
    assert stats_rows(remote.stats(DENSE), "l2") == expected
    assert remote.runs.equals(local.runs)
    name = "gpt_neox.layers.1.attention.dense.weight"
    assert torch.equal(remote.run("seed2").tensor(STEPS[-1], name),
                       open_archive(base / "archives" / "seed2").tensor(STEPS[-1], name))
    plotted = CliRunner().invoke(cli, ["plot", "hf://datasets/neox/seeds", "--match", DENSE,
                                       "--band", "--out", str(tmp_path / "band.png")])
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "band.png").read_bytes()[:4] == b"\x89PNG"
    commits = hub_server.commit_count("neox/seeds", repo_type="dataset")
    again = CliRunner().invoke(cli, ["catalog", *members, "--out", str(tmp_path / "catalog"),
                                     "--push-to", "neox/seeds"])
    assert again.exit_code == 0, again.output
    assert "0 added, 0 re-indexed, 3 unchanged" in again.output
    assert hub_server.commit_count("neox/seeds", repo_type="dataset") == commits
    assert hub_server.internal_errors == []


def test_a_new_hub_revision_is_reindexed_and_a_branch_is_kept(
    hub_server: HubServer, base: Path, tmp_path: Path
) -> None:
    import shutil

    copy = shutil.copytree(base / "archives" / "seed1", tmp_path / "seed1")
    push_archive(copy, "neox/seed1", retry=NO_WAIT)
    push_archive(copy, "neox/seed1", revision="v1", retry=NO_WAIT)
    out = tmp_path / "catalog"
    build_catalog(out, ["hf://datasets/neox/seed1", "hf://datasets/neox/seed1@v1"],
                  overrides={"hf://datasets/neox/seed1@v1": {"run": "seed1-v1"}}, retry=NO_WAIT)

    HfApi().upload_file(path_or_fileobj=b"notes\n", path_in_repo="NOTES.md",
                        repo_id="neox/seed1", repo_type="dataset")
    update = build_catalog(out, refresh=True, retry=NO_WAIT)

    assert update.reindexed == ["seed1"] and update.unchanged == ["seed1-v1"]
    runs = {r["run"]: r for r in open_catalog(out).runs.to_pylist()}
    assert runs["seed1"]["revision"] == hub_server.head("neox/seed1", repo_type="dataset")
    assert runs["seed1-v1"]["requested_revision"] == "v1"
    assert runs["seed1-v1"]["revision"] == hub_server.head("neox/seed1", repo_type="dataset",
                                                           revision="v1")


def test_a_renamed_run_leaves_no_stale_shard_on_the_hub(
    hub_server: HubServer, base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "catalog"
    build_catalog(out, [str(base / "archives" / f"seed{s}") for s in SEEDS])
    CliRunner().invoke(cli, ["catalog", "--out", str(out), "--push-to", "neox/seeds"])
    assert "index/tensors/seed3.parquet" in hub_server.list_files("neox/seeds", repo_type="dataset")

    result = CliRunner().invoke(cli, ["catalog", "--out", str(out), "--run", "seed3=run=third",
                                      "--push-to", "neox/seeds"])

    assert result.exit_code == 0, result.output
    remote = set(hub_server.list_files("neox/seeds", repo_type="dataset"))
    local = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert remote - {".gitattributes"} == local
    assert "index/tensors/third.parquet" in remote and "index/tensors/seed3.parquet" not in remote
    assert open_catalog("hf://datasets/neox/seeds").run_names == ["seed1", "seed2", "third"]
