"""`neox-export build --push-to` publishes step by step; with --delete-after-push the local
tensor files go once the Hub holds them, and a re-run still knows every step is done."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from exporter.cli import cli
from exporter.errors import ExporterError
from exporter.samples import TINY, tiny_run_config, write_run


def test_build_push_to_publishes_every_step_and_resumes_after_deleting(hub_server, tmp_path: Path) -> None:
    write_run(tmp_path / "run", TINY, steps=(0, 1, 2), dp=2, config=tiny_run_config(2))
    args = ["-q", "build", str(tmp_path / "run"), "--out", str(tmp_path / "a"),
            "--push-to", "neox/pushed", "--delete-after-push"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    remote = hub_server.list_files("neox/pushed", repo_type="dataset")
    for step in (0, 1, 2):
        assert f"steps/step{step}/model.safetensors" in remote
        assert f"steps/step{step}/optimizer/exp_avg_sq.safetensors" in remote
        assert f"index/tensors/step{step}.parquet" in remote
        assert not (tmp_path / "a" / "steps" / f"step{step}" / "model.safetensors").exists()
    assert "README.md" in remote and "manifest.json" in remote
    commits = hub_server.commit_count("neox/pushed", repo_type="dataset")

    again = CliRunner().invoke(cli, args[1:])  # without -q: the summary shows
    assert again.exit_code == 0, again.output
    assert "skipped" in again.output and "3 (already complete)" in again.output
    after = hub_server.list_files("neox/pushed", repo_type="dataset")
    assert {p: f.sha256 for p, f in after.items() if p.startswith("steps/")} == \
        {p: f.sha256 for p, f in remote.items() if p.startswith("steps/")}
    assert hub_server.commit_count("neox/pushed", repo_type="dataset") <= commits + 1


def test_delete_after_push_needs_push_to(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["build", str(tmp_path), "--out", str(tmp_path / "a"),
                                      "--delete-after-push"])
    assert result.exit_code == 2 and "--push-to" in result.output


def test_build_push_commits_steps_per_commit_and_refuses_a_max_disk_below_one_step(
        hub_server, tmp_path: Path) -> None:
    write_run(tmp_path / "run", TINY, steps=(0, 1, 2), dp=2, config=tiny_run_config(2))
    base = ["-q", "build", str(tmp_path / "run"), "--push-to", "neox/batched"]
    small = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "b"), "--max-disk", "1KB"])
    # An ExporterError: `neox-export` prints it as one line and exits 1.
    assert isinstance(small.exception, ExporterError)
    assert "raise --max-disk to at least" in str(small.exception)

    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "a"),
                                      "--steps-per-commit", "2", "--delete-after-push"])
    assert result.exit_code == 0, result.output
    # Steps 0 and 1, then step 2, then the card.
    assert hub_server.commit_count("neox/batched", repo_type="dataset") == 1 + 2 + 1
