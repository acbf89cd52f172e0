"""Pushing guards the Hub dataset: no commit when nothing changed, and no silent mixing of an
archive into a dataset built from another source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hubserver import HubServer

from exporter.cli import cli, main
from exporter.errors import PublishError
from exporter.hub.push import push_archive
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two folders holding the same run: two sources."""
    first = tmp_path_factory.mktemp("runs") / "first"
    write_run(first, TINY, steps=(0, 1), dp=2, config=tiny_run_config(1))
    return first, Path(shutil.copytree(first, first.parent / "second"))


def _commits(server: HubServer, repo: str) -> int:
    return server.commit_count(repo, repo_type="dataset")


def test_no_op_reruns_of_build_push_to_and_push_make_no_commit(
        hub_server: HubServer, runs, tmp_path: Path) -> None:
    out = tmp_path / "a"
    args = ["-q", "build", str(runs[0]), "--out", str(out), "--push-to", "neox/same"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    commits = _commits(hub_server, "neox/same")
    manifest = (out / "manifest.json").read_bytes()

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert _commits(hub_server, "neox/same") == commits
    assert (out / "manifest.json").read_bytes() == manifest

    pushed = CliRunner().invoke(cli, ["push", str(out), "neox/same"])
    assert pushed.exit_code == 0, pushed.output
    assert "0 commit(s)" in pushed.output
    assert _commits(hub_server, "neox/same") == commits


def test_push_into_a_dataset_of_another_source_is_refused_unless_forced(
        hub_server: HubServer, runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    build(LocalSource(runs[0]), first, BuildOptions(quiet=True))
    build(LocalSource(runs[1]), second, BuildOptions(quiet=True))
    push_archive(first, "neox/mixed")
    commits = _commits(hub_server, "neox/mixed")

    with pytest.raises(SystemExit) as refused:
        main(["push", str(second), "neox/mixed"])
    assert refused.value.code == 1
    error = capsys.readouterr().err
    assert str(runs[0]) in error and str(runs[1]) in error and "--force" in error
    assert _commits(hub_server, "neox/mixed") == commits
    with pytest.raises(PublishError, match="built from"):
        push_archive(second, "neox/mixed")
    with pytest.raises(SystemExit) as refused:  # build --push-to checks before its first commit
        main(["-q", "build", str(runs[1]), "--out", str(tmp_path / "third"), "--steps", "0",
              "--push-to", "neox/mixed"])
    assert refused.value.code == 1
    error = capsys.readouterr().err
    assert str(runs[0]) in error and str(runs[1]) in error
    assert _commits(hub_server, "neox/mixed") == commits

    forced = CliRunner().invoke(cli, ["push", str(second), "neox/mixed", "--force"])
    assert forced.exit_code == 0, forced.output
    remote = json.loads(hub_server.read_file("neox/mixed", "manifest.json", repo_type="dataset"))
    assert remote["source"] == json.loads((second / "manifest.json").read_text())["source"]
