"""Ctrl-C during `neox-export build` ends it within seconds, with exit 130, leaving every step
either complete or absent; the next build resumes.

SIGINT lands at seeded random instants of real builds of the Pythia-160M-shaped sample (one
step, one ZeRO partition, to keep the sample small): half of them over a whole-step build from
its start, half over an optimizer-only build, where the fp32 master file is the first written
(an interrupt there once hung a build for 12 minutes). Each build is a fork of a server process
that has imported everything already, so a trial costs its interrupt instant, not an
interpreter start; the forked build runs the real command line and exits as it would.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from exporter.archive.layout import step_dir
from exporter.convert import stream
from exporter.files import is_temporary
from exporter.pipeline.step import step_complete
from exporter.records import TensorJob, chunks_of
from exporter.samples import PYTHIA_160M, TINY, tiny_run_config, write_run
from exporter.sources import LocalSource

TRIALS = 30
SEED = 20261204
EXIT_WITHIN_S = 10.0  # from SIGINT to exit, on a loaded 2-core CI machine
ROOT = Path(__file__).parent.parent

# Forks one `neox-export ARGS` per line read (ARGS as JSON); reports `pid N`, then `exit CODE`.
SERVER = r"""
import faulthandler, json, os, signal, sys
import torch  # noqa: F401 - imported once here, not in every fork
import exporter.pipeline.run, exporter.pipeline.export, exporter.hub.publish  # noqa: F401
from exporter.cli.main import run

print("ready", flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)
    args, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        break
    print(f"pid {pid}", flush=True)
    print(f"exit {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}", flush=True)

# The forked build: output to its log, all threads' stacks there on SIGUSR1 (a hang).
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
os.dup2(fd, 1)
os.dup2(fd, 2)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
faulthandler.register(signal.SIGUSR1, all_threads=True)
sys.argv = ["neox-export", *args]
run()  # as the installed command ends: its exit, not the interpreter's teardown
"""


class BuildServer:
    """A process that forks builds on demand (see SERVER)."""

    def __init__(self, workdir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=workdir)
        assert self._line(120) == "ready"

    def _line(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else None

    def start(self, args: list[str], log: Path) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([args, str(log)]) + "\n")
        self.proc.stdin.flush()
        line = self._line(60)
        assert line is not None and line.startswith("pid "), line
        return int(line.split()[1])

    def result(self, pid: int, log: Path, timeout: float) -> tuple[int, float]:
        """The build's exit code and how long it took to end; a hang fails with its stacks."""
        started = time.monotonic()
        line = self._line(timeout)
        if line is None:
            for sig in (signal.SIGUSR1, signal.SIGKILL):  # its stacks into the log, then end it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                time.sleep(1)
            self._line(30)
            pytest.fail(f"build {pid} still running {timeout:.0f} s after SIGINT:\n{log.read_text()}")
        assert line.startswith("exit "), line
        return int(line.split()[1]), time.monotonic() - started

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _leftovers(archive: Path, steps: list[int]) -> list[str]:
    """Partial work an interrupted build left: temporaries, and steps neither complete nor
    absent (a step folder or index shard without the step being complete)."""
    found = [str(p.relative_to(archive)) for p in archive.rglob("*") if is_temporary(p)]
    for step in steps:
        present = [p for p in (step_dir(archive, step),
                               archive / "index" / "tensors" / f"step{step}.parquet",
                               archive / "index" / "checkpoints" / f"step{step}.parquet")
                   if p.exists()]
        if present and not step_complete(archive, step, verify=False):
            found += [f"step {step} incomplete: {p.relative_to(archive)}" for p in present]
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("run160m")
    write_run(folder, PYTHIA_160M, steps=(0,), dp=1)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # 2 GB: not kept for the rest of the suite


@pytest.mark.slow
def test_sigint_at_random_instants_ends_the_build_cleanly_and_the_rerun_resumes(
        run: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    server = BuildServer(tmp_path)
    archives = {"all": (tmp_path / "all", []),
                "optimizer": (tmp_path / "opt", ["--include", "optimizer"])}
    # Instants spread over the first seconds of each build: the step's scan, the model file and
    # the start of the optimizer files ("all"), the master file ("optimizer").
    spans = {"all": 3.0, "optimizer": 2.5}
    codes: list[int] = []
    try:
        for trial in range(TRIALS):
            kind = "all" if trial % 2 == 0 else "optimizer"
            archive, extra = archives[kind]
            log = tmp_path / f"trial{trial}.log"
            pid = server.start(["-q", "build", str(run), "--out", str(archive), *extra], log)
            time.sleep(rng.uniform(0.05, spans[kind]))
            with contextlib.suppress(ProcessLookupError):  # it may have finished already
                os.kill(pid, signal.SIGINT)
            code, seconds = server.result(pid, log, EXIT_WITHIN_S)
            codes.append(code)
            assert code in (130, 0), f"trial {trial}: exit {code}\n{log.read_text()}"
            assert _leftovers(archive, [0]) == [], f"trial {trial}\n{log.read_text()}"
            if code == 130:
                assert "aborted" in log.read_text()
            else:  # finished before the interrupt: start the next trial from nothing again
                shutil.rmtree(archive)
        assert codes.count(130) >= TRIALS * 2 // 3, codes

        # The rerun completes the step the interrupted builds left absent.
        shutil.rmtree(archives["optimizer"][0], ignore_errors=True)
        archive, extra = archives["all"]
        log = tmp_path / "rerun.log"
        code, _ = server.result(server.start(["-q", "build", str(run), "--out", str(archive)], log),
                                log, 600)
        assert code == 0, log.read_text()
        assert step_complete(archive, 0) and _leftovers(archive, [0]) == []
    finally:
        server.close()


def test_an_interrupted_step_does_not_wait_for_its_source_to_be_hashed(tmp_path: Path) -> None:
    """The source's sha256s are computed in a thread while a step converts; a step that ends
    early (Ctrl-C) stops that hash instead of waiting for gigabytes to be read (the pool's exit
    and the interpreter's exit both join the thread)."""
    write_run(tmp_path / "run", TINY, steps=(0,), dp=1, config=tiny_run_config(0))
    with open(tmp_path / "run" / "step0" / "big.bin", "wb") as fh:
        fh.truncate(16 << 30)  # sparse: 16 GiB of zeros to hash, no disk used
    source = LocalSource(tmp_path / "run")
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), source.fetch(0):
        time.sleep(0.2)  # the hash is under way
        raise KeyboardInterrupt
    assert time.monotonic() - started < 3


def test_an_interrupted_file_write_does_not_wait_for_a_stuck_stage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while a pipeline thread is stuck (as one is after a wake-up lost to an interrupt
    inside ``queue.Queue``): the write gives up on the thread within ABANDON_S, removes its
    temporary file and lets the interrupt through."""
    release = threading.Event()
    monkeypatch.setattr(stream._Writer, "write", lambda self, name, data: release.wait(60))
    job = TensorJob("w", "model", torch.float32, (64 * 1024,), chunks_of(torch.zeros(64 * 1024)))
    converter = stream.Converter(chunk_bytes=4096)
    # SIGINT reaches the main thread while it waits for the stuck writer to take a chunk.
    interrupt = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    try:
        interrupt.start()
        with pytest.raises(KeyboardInterrupt):
            converter.write_file(tmp_path / "w.safetensors", [job], tmp_path)
        assert time.monotonic() - started < 6  # the interrupt, ABANDON_S, clean-up
    finally:
        interrupt.cancel()
        release.set()
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_between_the_step_folder_and_its_index_leaves_no_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.pipeline import step as step_module
    from exporter.pipeline.run import BuildOptions, build

    write_run(tmp_path / "run", TINY, steps=(0,), dp=1)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(step_module, "_write_index", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(LocalSource(tmp_path / "run"), tmp_path / "archive", BuildOptions())
    assert not step_dir(tmp_path / "archive", 0).exists()
