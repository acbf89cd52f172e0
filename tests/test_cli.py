"""The neox-export command: help, version, errors as one line, and the main commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from exporter import __version__
from exporter.cli import cli
from exporter.samples import TINY, write_checkpoint

COMMANDS = sorted(cli.commands)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and "Example" in result.output


def test_version() -> None:
    result = _cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_bad_input_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "layer_00-model_00-model_states.pt").write_bytes(b"not a zip")
    (tmp_path / "ck" / "mp_rank_00_model_states.pt").write_bytes(b"")
    result = _cli("convert", str(tmp_path / "ck"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neox-export: error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = _cli("convert", str(tmp_path), "--out", str(tmp_path / "o"), "--include", "weights")
    assert result.returncode == 2 and "--include" in result.stderr


def test_convert_and_inspect(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ck", TINY, dp=2)
    result = _cli("convert", str(tmp_path / "ck"), "--out", str(tmp_path / "out"), "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    assert (tmp_path / "out" / "optimizer" / "master.safetensors").exists()
    report = _cli("inspect", "--json", str(tmp_path / "ck"))
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler" in [g["name"] for g in data["globals"]]
    assert data["unknown_globals"] == []
    text = _cli("inspect", str(tmp_path / "ck" / "layer_02-model_00-model_states.pt"))
    assert "attention.dense.weight" in text.stdout and "float16" in text.stdout


def test_inspect_flags_unknown_globals(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "obj": _Odd()}, tmp_path / "x.pt")
    result = _cli("inspect", str(tmp_path / "x.pt"))
    assert result.returncode == 0
    assert "! test_cli._Odd" in result.stdout or "! tests.test_cli._Odd" in result.stdout


class _Odd:
    pass


def test_build_verify_and_sample(tmp_path: Path) -> None:
    assert _cli("sample", str(tmp_path / "run"), "--steps", "0,2").returncode == 0
    built = _cli("-q", "build", str(tmp_path / "run"), "--out", str(tmp_path / "a"), "--log-json")
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout.strip().splitlines()[-1])
    assert summary["steps_done"] == 2
    events = [json.loads(line) for line in built.stderr.splitlines() if line.startswith("{")]
    assert sorted(e["step"] for e in events) == [0, 2]
    verified = _cli("verify", str(tmp_path / "a"))
    assert verified.returncode == 0 and "all checks passed" in verified.stdout


def test_convert_keeps_its_result_for_the_exit(tmp_path: Path) -> None:
    # The command line ends without tearing the interpreter down: the export's plan is left
    # to the process's end, not freed record by record as the command returns. One result
    # at a time, in a process that runs commands in turn.
    from exporter.cli import convert as convert_module

    write_checkpoint(tmp_path / "ck", TINY, dp=2)
    for out in ("a", "b"):
        result = CliRunner().invoke(cli, ["-q", "convert", str(tmp_path / "ck"), "--out",
                                          str(tmp_path / out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert [kept.out_dir for kept in convert_module._KEPT] == [tmp_path / out]  # type: ignore[attr-defined]
        assert convert_module._KEPT[0].optimizer is not None  # type: ignore[attr-defined]
