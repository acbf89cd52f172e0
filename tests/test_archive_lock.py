"""One writer at a time: build and push hold the archive's lock; a second writer is refused
naming the holder (or waits with --wait); a dead holder's lock is free; readers need none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter import open_archive
from exporter.archive.lock import archive_lock
from exporter.cli import main
from exporter.errors import ArchiveLockedError
from exporter.hub.push import push_archive
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource
from exporter.verify import verify_path

STEPS = (0, 1, 2, 4, 8)
ROOT = Path(__file__).parent.parent
HOLD = """
import sys
from exporter.archive.lock import archive_lock
with archive_lock(sys.argv[1], command="holding for a test"):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    write_run(folder, TINY, steps=STEPS, dp=2, config=tiny_run_config(STEPS[-1]))
    return folder


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _holder(root: Path) -> subprocess.Popen[str]:
    """A process holding the lock of ``root`` until its stdin gets a line."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def _cli(*args: str) -> int:
    """``neox-export ARGS`` in this process; its exit code."""
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_a_second_build_started_during_a_build_is_refused_and_the_first_completes(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a"
    first = subprocess.Popen([sys.executable, "-c", "from exporter.cli import main; main()", "-q", "build", str(run),
                              "--out", str(out)], env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # As soon as the first build has started writing (its manifest or a step exists).
        while not ((out / "manifest.json").exists() or (out / "steps").exists()):
            assert first.poll() is None and time.monotonic() < deadline, "first build ended early"
            time.sleep(0.01)
        assert first.poll() is None
        code = _cli("-q", "build", str(run), "--out", str(out))
        error = capsys.readouterr().err
        assert code == 1, error
        assert f"pid {first.pid}" in error and "--wait" in error
    finally:
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert all(report.ok for report in verify_path(out))


def test_build_and_push_name_the_holder_and_readers_need_no_lock(
        hub_server, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a"
    build(LocalSource(run), out, BuildOptions(steps="0,1", quiet=True))
    holder = _holder(out)
    try:
        with pytest.raises(ArchiveLockedError, match=f"pid {holder.pid} .*holding for a test"):
            build(LocalSource(run), out, BuildOptions(steps="0,1,2", quiet=True))
        code = _cli("push", str(out), "neox/locked")
        error = capsys.readouterr().err
        assert code == 1 and f"pid {holder.pid}" in error
        assert not hub_server.repo_exists("neox/locked", repo_type="dataset")
        assert [r.ok for r in verify_path(out)] == [True, True]
        assert open_archive(out).steps == [0, 1]
        assert not (out / "steps" / "step2").exists()
    finally:
        holder.communicate("\n", timeout=30)
    push_archive(out, "neox/locked")


def test_wait_takes_the_lock_once_the_holder_is_done(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    holder = _holder(out)
    started = time.monotonic()
    subprocess.Popen(["sh", "-c", f"sleep 1; kill {holder.pid}"])
    summary = build(LocalSource(run), out, BuildOptions(steps="0", quiet=True, wait=True))
    assert time.monotonic() - started >= 1
    assert [o.status for o in summary.outcomes] == ["done"]
    holder.wait(timeout=30)


def test_the_holder_may_take_its_lock_again_and_others_may_not(tmp_path: Path) -> None:
    with archive_lock(tmp_path, command="outer"):
        with archive_lock(tmp_path):
            pass
        other = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path)], input="\n",
                               text=True, capture_output=True, env=_env(), timeout=60)
        assert other.returncode != 0
        assert f"ArchiveLockedError: {tmp_path} is being written by pid {os.getpid()}" in other.stderr
        assert "(outer, since" in other.stderr
    assert _holder(tmp_path).communicate("\n", timeout=30)[0] == ""


def test_the_lock_of_a_killed_holder_is_taken_over(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert str(holder.pid) in (out / ".lock").read_text()  # its name is still there
    summary = build(LocalSource(run), out, BuildOptions(steps="0", quiet=True))
    assert [o.status for o in summary.outcomes] == ["done"]
    assert str(os.getpid()) in (out / ".lock").read_text()
