"""How the installed command ends: its status, its output written out, ``atexit`` handlers
and running threads seen to, and the interpreter's teardown skipped (``exporter.cli.run``);
and how it starts (``exporter.launcher``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exporter import launcher
from exporter.cli.main import run

# A child process that runs the command as the console script does, after making what a
# normal exit would see to: an atexit handler, a finalizer of the interpreter's teardown
# (a global whose __del__ runs only then), and optionally a thread still running.
_CHILD = textwrap.dedent("""
    import atexit, sys, threading, time
    atexit.register(lambda: print("atexit ran", flush=True))

    class Teardown:
        def __del__(self):
            print("teardown ran", flush=True)

    keep = Teardown()
    if "--thread" in sys.argv:
        sys.argv.remove("--thread")
        def late():
            time.sleep(0.3)
            print("thread finished", flush=True)
        threading.Thread(target=late).start()
    from exporter.launcher import run
    sys.argv[0] = "neox-export"
    run()
""")


def _command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True,
                          text=True, timeout=300)


def test_a_finished_command_skips_the_teardown_but_not_atexit() -> None:
    ran = _command("--help")
    assert ran.returncode == 0, ran.stderr
    assert "Usage: neox-export" in ran.stdout
    assert "atexit ran" in ran.stdout
    assert "teardown ran" not in ran.stdout  # the half-second teardown did not run


def test_a_usage_error_keeps_its_status_and_line() -> None:
    ran = _command("verify", "/no/such/folder")
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.startswith("neox-export verify: error:") and "does not exist" in ran.stderr
    assert "atexit ran" in ran.stdout


def test_a_status_a_command_exits_with_is_kept(tmp_path: Path) -> None:
    # `build --keep-going` ends with ctx.exit(1) when a step failed: Click, not standalone,
    # returns that status from main() rather than raising it.
    (tmp_path / "run" / "step0").mkdir(parents=True)
    (tmp_path / "run" / "step0" / "mp_rank_00_model_states.pt").write_bytes(b"not a zip")
    ran = _command("-q", "build", str(tmp_path / "run"), "--out", str(tmp_path / "archive"),
                   "--keep-going")
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "step 0" in ran.stderr
    assert "atexit ran" in ran.stdout


def test_an_exporter_error_exits_1_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    ran = _command("inspect", str(tmp_path))
    assert ran.returncode == 1, ran.stderr
    assert ran.stderr.startswith("neox-export: error:")
    assert "atexit ran" in ran.stdout


def test_a_thread_still_running_is_waited_for() -> None:
    ran = _command("--thread", "--version")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.index("thread finished") < ran.stdout.index("atexit ran")


def test_output_is_written_out_when_stdout_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "help.txt"
    with open(out, "w") as fh:  # a file: block-buffered, nothing written until flushed
        ran = subprocess.run([sys.executable, "-m", "exporter", "--help"], stdout=fh,
                             stderr=subprocess.PIPE, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    text = out.read_text()
    assert text.startswith("Usage: neox-export") and "convert" in text


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_that_cannot_be_written_is_not_a_success() -> None:
    with open("/dev/full", "w") as full:
        ran = subprocess.run([sys.executable, "-m", "exporter", "--help"], stdout=full,
                             stderr=subprocess.PIPE, timeout=300)
    assert ran.returncode != 0


def test_the_installed_command_is_run() -> None:
    import importlib.metadata

    scripts = importlib.metadata.entry_points(group="console_scripts")
    (entry,) = [e for e in scripts if e.name == "neox-export"]
    assert entry.load() is launcher.run


def test_without_cpython_s_exit_functions_the_exit_is_the_normal_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import atexit
    import importlib

    cli_main = importlib.import_module("exporter.cli.main")  # the module, not the function
    monkeypatch.delattr(atexit, "_run_exitfuncs")
    monkeypatch.setattr(cli_main, "main", lambda: 3)
    with pytest.raises(SystemExit) as ended:  # not os._exit: this process goes on
        run()
    assert ended.value.code == 3


def test_a_ctrl_c_as_the_command_returns_exits_130(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import atexit
    import importlib

    cli_main = importlib.import_module("exporter.cli.main")

    def interrupted() -> int:
        raise KeyboardInterrupt  # past Click's own handling, which turns it into "aborted"

    monkeypatch.delattr(atexit, "_run_exitfuncs")
    monkeypatch.setattr(cli_main, "main", interrupted)
    with pytest.raises(SystemExit) as ended:
        run()
    assert ended.value.code == 130
    assert "aborted" in capsys.readouterr().err


def test_a_ctrl_c_while_the_command_exits_does_not_cut_the_exit_short() -> None:
    # SIGINT while the atexit handlers run (the work done, its output being written out):
    # ignored, the handlers finish and the status is the command's.
    child = _CHILD.replace('atexit.register(lambda: print("atexit ran", flush=True))', (
        "import os, signal\n"
        "def handler():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    print('atexit ran', flush=True)\n"
        "atexit.register(handler)"))
    assert child != _CHILD
    ran = subprocess.run([sys.executable, "-c", child, "--version"], capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert "atexit ran" in ran.stdout and "KeyboardInterrupt" not in ran.stderr


# The launcher's start, seen from inside: the collections made while the command is imported
# and run, the objects left frozen, the collector's state and the environment at the end.
_START = textwrap.dedent("""
    import atexit, gc, json, os, sys
    collections = []
    gc.callbacks.append(lambda phase, info: phase == "start"
                        and collections.append(info["generation"]))
    atexit.register(lambda: print(json.dumps({
        "collections": collections, "frozen": gc.get_freeze_count(),
        "enabled": gc.isenabled(), "blas": os.environ.get("OPENBLAS_NUM_THREADS")})))
    from exporter.launcher import run
    sys.argv = ["neox-export", "--help"]
    run()
""")


def _start(env: dict[str, str | None] | None = None) -> dict[str, object]:
    """The launcher's start in a child whose environment is this one's with ``env`` applied
    (None removes a variable)."""
    import json
    import os

    environ = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    ran = subprocess.run([sys.executable, "-c", _START], capture_output=True, text=True,
                         timeout=300, env=environ)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout.splitlines()[-1])


def test_the_command_s_imports_are_not_walked_by_the_collector() -> None:
    started = _start()
    # Importing numpy, click and the package triggers collections when the collector runs
    # meanwhile; after it, what they made is frozen out of its walks (tens of thousands of
    # objects: torch, a million more, is imported only by commands that cast or load tensors).
    assert started["collections"].count(2) == 0, started
    assert len(started["collections"]) < 20, started
    assert started["frozen"] > 20_000, started
    assert started["enabled"] is True


def test_blas_runs_on_the_calling_thread_unless_the_environment_says() -> None:
    assert _start({"OPENBLAS_NUM_THREADS": None})["blas"] == "1"
    assert _start({"OPENBLAS_NUM_THREADS": "2"})["blas"] == "2"
