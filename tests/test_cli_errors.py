"""What a new user hits on the command line: every mistake is one line naming the problem and
what to do (exit 1; a mistyped command line exits 2), and nothing of the user's is mixed into
or left behind by a failed command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import Ran, assert_one_error_line, run_cli, tiny_run

from exporter import open_archive
from exporter.errors import ArchiveError
from exporter.records import KINDS


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of one tiny checkpoint (step0/), model weights and ZeRO partitions."""
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def archive(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter import BuildOptions, build, open_source

    out = tmp_path_factory.mktemp("built") / "archive"
    build(open_source(str(run)), out, BuildOptions(quiet=True))
    return out


# -- point 7: build --out into a folder of the user's -------------------------------------------

def test_build_refuses_a_non_empty_folder_that_is_not_an_archive(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    ran = run_cli(capsys, "build", run, "--out", out)
    assert_one_error_line(ran, 1, str(out), "notes.txt", "new or empty folder")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_build_resumes_an_archive_and_fills_an_empty_folder(
        run: Path, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "-q", "build", run, "--out", archive).code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capsys, "-q", "build", run, "--out", empty).code == 0
    assert (empty / "manifest.json").is_file()


# -- point 10: one line naming the problem and what to do ---------------------------------------

@pytest.mark.parametrize("source", ["local", "hf://org/model"])
def test_a_bad_max_disk_is_a_usage_error_for_any_source(
        source: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = str(run) if source == "local" else source
    ran = run_cli(capsys, "build", src, "--out", tmp_path / "a", "--max-disk", "20GBs")
    assert_one_error_line(ran, 2, "--max-disk", "20GBs", "20GB")
    assert not (tmp_path / "a").exists()


def test_max_disk_with_a_local_source_is_checked_and_bounds_the_build(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran = run_cli(capsys, "build", run, "--out", tmp_path / "a", "--max-disk", "20GBs")
    assert_one_error_line(ran, 2, "--max-disk", "20GBs")
    ran = run_cli(capsys, "-q", "build", run, "--out", tmp_path / "b", "--max-disk", "20GB")
    assert ran.code == 0, ran.err


def test_convert_out_a_file_names_the_file(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    ran = run_cli(capsys, "convert", run / "step0", "--out", target)
    line = assert_one_error_line(ran, 2, str(target), "is a file", "--out")
    assert "Errno" not in line


def test_build_of_org_name_suggests_the_hub_uri(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ran = run_cli(capsys, "build", "EleutherAI/neox-ckpt-pythia-410m-seed8", "--out", "a")
    assert_one_error_line(ran, 1, "no such folder", "hf://EleutherAI/neox-ckpt-pythia-410m-seed8")
    assert not (tmp_path / "a").exists()


def test_convert_of_a_run_suggests_build(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    two_steps = tmp_path / "run"
    for step in (0, 8):
        shutil.copytree(run / "step0", two_steps / f"step{step}")
    ran = run_cli(capsys, "convert", two_steps, "--out", tmp_path / "o")
    assert_one_error_line(ran, 1, "training run", f"neox-export build {two_steps}", "step0, step8")
    assert not (tmp_path / "o").exists()


def test_a_mistyped_option_is_one_line_with_where_to_find_help(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran = run_cli(capsys, "build", run, "--out", tmp_path / "a", "--stepz", "0")
    assert_one_error_line(ran, 2, "neox-export build", "--stepz", "--help")


def test_tensor_with_a_step_that_is_not_an_int_says_so(archive: Path) -> None:
    arc = open_archive(archive)
    name = "gpt_neox.layers.0.attention.dense.weight"
    with pytest.raises(ArchiveError, match=r"step must be an int.*'0'.*steps: \[0\]"):
        arc.tensor("0", name)  # type: ignore[arg-type]
    with pytest.raises(ArchiveError, match=r"step must be an int"):
        arc.state_dict("0")  # type: ignore[arg-type]
    assert arc.tensor(0, name).shape == (32, 32)


def test_an_unknown_kind_lists_the_valid_ones(archive: Path) -> None:
    arc = open_archive(archive)
    with pytest.raises(ArchiveError, match="unknown kind 'adam'") as error:
        arc.tensor(0, "gpt_neox.layers.0.attention.dense.weight", kind="adam")
    assert all(kind in str(error.value) for kind in KINDS)
    with pytest.raises(ArchiveError, match="unknown kind 'masters'"):
        arc.state_dict(0, kind="masters")


# -- point 16: small things ---------------------------------------------------------------------

def test_verify_of_a_model_only_folder_says_the_invariant_was_skipped(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model-only"
    assert run_cli(capsys, "-q", "convert", run / "step0", "--out", out, "--include", "model").code == 0
    ran = run_cli(capsys, "verify", out)
    assert ran.code == 0, ran.err
    assert "master->model    skipped: no optimizer state" in ran.out
    assert "0/0" not in ran.out


def test_verify_of_a_lone_step_folder_says_hashes_were_not_checked(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "step0"
    assert run_cli(capsys, "-q", "convert", run / "step0", "--out", out).code == 0
    ran = run_cli(capsys, "verify", out)
    assert ran.code == 0, ran.err
    assert "hashes           skipped: no index" in ran.out
    assert "master->model    ok" in ran.out


def test_verify_of_a_checkpoint_without_optimizer_files_says_skipped(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    folder = Path(shutil.copytree(run / "step0", tmp_path / "ck"))
    for optim in folder.glob("zero_pp_rank_*"):
        optim.unlink()
    ran = run_cli(capsys, "verify", folder)
    assert "master->model    skipped: no optimizer state" in ran.out, ran.out
    assert "partitions       skipped: no optimizer state" in ran.out


def test_a_failed_step_is_reported_once(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run / "step0", broken / "step0")
    optim = sorted((broken / "step0").glob("zero_pp_rank_*"))[0]
    optim.write_bytes(optim.read_bytes()[:1000])
    # A child process: its logging starts unconfigured, as the console script's does.
    done = subprocess.run([sys.executable, "-m", "exporter", "build", str(broken), "--out",
                           str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert_one_error_line(Ran(done.returncode, done.stdout, done.stderr), 1, "step 0:", optim.name)


def test_a_build_that_fails_before_writing_leaves_no_out_folder(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran = run_cli(capsys, "build", run, "--out", tmp_path / "new" / "a", "--steps", "99")
    assert_one_error_line(ran, 1, "step 99")
    assert not (tmp_path / "new" / "a").exists()


def test_sample_refuses_an_existing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    ran = run_cli(capsys, "sample", out, "--steps", "0")
    assert_one_error_line(ran, 2, str(out), "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_progress_bars_count_bytes_in_gb_like_the_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.pipeline import progress

    made: list[dict] = []

    class Bar:
        def __init__(self, **kwargs: object) -> None:
            made.append(kwargs)

        def update(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(progress, "tqdm", Bar)
    with progress.byte_bar("step 0", total=10**9):
        pass
    assert made[0]["unit_divisor"] == 1000 and made[0]["unit"] == "B"
