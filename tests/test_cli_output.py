"""How much the command says: -v/-q before or after the command name, -q keeps warnings and
drops bars and summaries, -vv adds debug lines. Run as child processes, whose logging starts
unconfigured and whose stderr is a pipe (not a terminal), as in a batch job."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli, tiny_run


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def model_only(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint without ZeRO files: converting it logs a warning."""
    folder = Path(shutil.copytree(run / "step0", tmp_path_factory.mktemp("m") / "step0"))
    for optim in folder.glob("zero_pp_rank_*"):
        optim.unlink()
    return folder


def test_quiet_keeps_warnings_and_drops_the_summary(model_only: Path, tmp_path: Path) -> None:
    done = _cli("-q", "convert", model_only, "--out", tmp_path / "o")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "WARNING" in done.stderr and "no ZeRO optimizer files" in done.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_verbose_after_the_command_and_vv_adds_debug_lines(run: Path, tmp_path: Path) -> None:
    info = _cli("build", run, "--out", tmp_path / "a", "-v")
    assert info.returncode == 0, info.stderr
    assert "INFO exporter.pipeline.run: step 0 done" in info.stderr
    assert "DEBUG" not in info.stderr
    assert "\r" not in info.stderr and "\x1b[" not in info.stderr  # stderr is a pipe: no bars
    debug = _cli("-vv", "build", run, "--out", tmp_path / "a")
    assert debug.returncode == 0, debug.stderr
    assert "DEBUG exporter.pipeline.run: step 0: complete" in debug.stderr, debug.stderr


def test_quiet_after_the_command(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran = run_cli(capsys, "build", run, "--out", tmp_path / "a", "--quiet")
    assert ran.code == 0 and ran.out == ""
    hub_logger = logging.getLogger("huggingface_hub")
    before = hub_logger.level
    ran = run_cli(capsys, "build", run, "--out", tmp_path / "a", "-v", "-v")  # counts add up
    assert ran.code == 0 and "DEBUG exporter.pipeline.run" in ran.err
    assert hub_logger.level == logging.DEBUG  # huggingface_hub's requests show too
    ran = run_cli(capsys, "build", run, "--out", tmp_path / "a")
    assert ran.code == 0 and "steps skipped   1" in ran.out
    assert hub_logger.level == before


def test_quiet_drops_hub_progress_bars_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import io

    from exporter.cli.logs import setup_logging

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)  # the user's default
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", {})

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    setup_logging(0, quiet=False)
    assert not hub_tqdm.are_progress_bars_disabled()
    setup_logging(0, quiet=True)
    assert hub_tqdm.are_progress_bars_disabled()
