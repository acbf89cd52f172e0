"""Running ``neox-export`` in the test process, as the console script does (``exporter.cli.main``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.cli.main import main
from exporter.samples import TINY, write_checkpoint


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    """Run the command line ``args``; its exit code and what it printed."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return Ran(code, out, err)


def assert_one_error_line(ran: Ran, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one line on stderr, no traceback, every needle in that line."""
    assert ran.code == code, (ran.code, ran.err)
    assert "Traceback" not in ran.err
    assert len(ran.err_lines) == 1, ran.err
    line = ran.err_lines[0]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def tiny_run(tmp_path_factory: pytest.TempPathFactory, steps: tuple[int, ...] = (0,)) -> Path:
    """A run folder of tiny checkpoints (``step{N}/``: model weights and two ZeRO partitions)."""
    folder = tmp_path_factory.mktemp("run")
    for step in steps:
        write_checkpoint(folder / f"step{step}", TINY, step=step, dp=2)
    return folder
