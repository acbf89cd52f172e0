"""Set-up as the README tells it: `make demo` needs only the package, `make test` the extras,
both through constraints.txt; the README's layout is what `build` writes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _dry_run(target: str, tmp_path: Path) -> list[str]:
    """The commands `make TARGET` would run on a fresh machine (no .venv yet)."""
    if shutil.which("make") is None:
        pytest.fail("make is needed to check the Makefile")
    done = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={tmp_path / 'venv'}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _installs(lines: list[str]) -> list[str]:
    return [line for line in lines if " install " in line and "pip" in line]


def test_make_demo_installs_the_package_alone_through_the_constraints(tmp_path: Path) -> None:
    installs = _installs(_dry_run("demo", tmp_path))
    assert installs, "make demo installs nothing"
    for line in installs:
        assert "-c constraints.txt" in line
        assert "[test" not in line and "ray" not in line, line


def test_make_test_installs_the_extras_through_the_constraints(tmp_path: Path) -> None:
    installs = _installs(_dry_run("test", tmp_path))
    assert any("[test,ray]" in line and "-c constraints.txt" in line for line in installs), installs


def test_readme_says_how_to_put_the_command_on_path() -> None:
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in setup


def _layout_blocks() -> tuple[str, str]:
    section = README.split("## Output layout", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "one block for what build writes, one for what push adds"
    return blocks[0], blocks[1]


def _top_level(block: str) -> set[str]:
    return {m.split("/")[0] for m in re.findall(r"^  (\S+)", block, flags=re.M)}


def test_readme_layout_lists_every_archive_entry_by_the_command_that_writes_it() -> None:
    from exporter.archive.layout import ARCHIVE_ENTRIES

    built, pushed = _layout_blocks()
    assert "README.md" not in _top_level(built) and "assets" not in _top_level(built)
    assert {"README.md", "assets"} <= _top_level(pushed)
    assert _top_level(built) | _top_level(pushed) == set(ARCHIVE_ENTRIES)


def test_build_writes_what_the_readme_says_it_writes(tmp_path: Path) -> None:
    from exporter import BuildOptions, build, open_source
    from exporter.samples import TINY, write_checkpoint

    write_checkpoint(tmp_path / "run" / "step0", TINY, dp=2)
    build(open_source(str(tmp_path / "run")), tmp_path / "a", BuildOptions(quiet=True))
    built, _ = _layout_blocks()
    written = {p.name for p in (tmp_path / "a").iterdir()}
    assert written <= _top_level(built), written - _top_level(built)
    assert "README.md" not in written and "assets" not in written
