"""A build killed at any moment and re-run converges to the archive of an uninterrupted build.

``neox-export build`` is SIGKILLed at seeded random moments of its work (from its first step
folder on, within the time the steps it has left took in an uninterrupted build of the same
run), several times over one archive, then re-run to completion. Every file under ``steps/``
and every row of the tensor index must equal the uninterrupted build's, no temporary file may
remain, and between kills every step folder that is visible at all must already be complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from exporter.samples import TINY, write_run

KILLS = 5
SEED = 20240601


def _start(run: Path, archive: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "exporter", "-q", "build", str(run), "--out", str(archive),
         "--log-json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _step_files(archive: Path) -> dict[str, str]:
    steps = archive / "steps"
    if not steps.is_dir():
        return {}
    return {str(p.relative_to(archive)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(steps.rglob("*")) if p.is_file() and not _temporary(p, archive)}


def _temporary(path: Path, root: Path) -> bool:
    return any(".tmp" in part or ".partial" in part for part in path.relative_to(root).parts)


def _tensor_index(archive: Path) -> list[dict]:
    rows = []
    for shard in sorted((archive / "index" / "tensors").glob("step*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return sorted(rows, key=lambda r: (r["step"], r["kind"], r["name"]))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted build of five trained TINY steps with optimizer, and its timing."""
    root = tmp_path_factory.mktemp("crash")
    write_run(root / "run", TINY, steps=[0, 1, 2, 3, 4], dp=2)
    start = time.monotonic()
    process = _start(root / "run", root / "baseline")
    events = []
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("{"):
            events.append(time.monotonic() - start)
    process.wait(timeout=300)
    total = time.monotonic() - start
    assert process.returncode == 0
    assert len(events) == 5
    step_seconds = (events[-1] - events[0]) / 4
    return {
        "run": root / "run",
        "root": root,
        "files": _step_files(root / "baseline"),
        "index": _tensor_index(root / "baseline"),
        "step_seconds": step_seconds,
        "total": total,
    }


def _wait_for_work(process: subprocess.Popen[str], archive: Path) -> bool:
    """Block until ``process`` opens its first step folder; False if it exits first."""
    # export.py writes each step into steps/.step{N}.partial-{pid} before renaming it.
    partial = f".partial-{process.pid}"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        steps = archive / "steps"
        if steps.is_dir() and any(partial in p.name for p in steps.iterdir()):
            return True
        time.sleep(0.002)
    return False


def _converged(archive: Path, baseline: dict) -> None:
    assert _step_files(archive) == baseline["files"]
    assert _tensor_index(archive) == baseline["index"]


def test_killed_builds_converge_to_the_uninterrupted_archive(baseline: dict) -> None:
    # Kills land at seeded moments, but whether a moment falls inside the build's work depends
    # on the machine's pace that moment: a build that ends before its kill has completed its
    # archive, which must then equal the baseline, and the kills go on in a new archive.
    rng = random.Random(SEED)
    kill_points: list[float] = []
    archives = 1
    archive = baseline["root"] / "killed-1"
    for _ in range(4 * KILLS):
        if len(kill_points) == KILLS:
            break
        indexed = archive / "index" / "tensors"
        remaining = 5 - (len(list(indexed.glob("*.parquet"))) if indexed.is_dir() else 0)
        # A seeded moment within the work this run still has, in steps of the baseline's pace.
        delay = rng.uniform(0.0, max(remaining, 1) * baseline["step_seconds"])
        process = _start(baseline["run"], archive)
        if _wait_for_work(process, archive):
            time.sleep(delay)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        if process.returncode == -signal.SIGKILL:
            kill_points.append(round(delay, 3))
        # Between crashes: what is visible is complete, and the manifest is whole JSON.
        for path, digest in _step_files(archive).items():
            assert baseline["files"].get(path) == digest, f"{path} visible before complete"
        if (archive / "manifest.json").exists():
            json.loads((archive / "manifest.json").read_text())
        if process.returncode != -signal.SIGKILL:  # it ended on its own, before the kill
            assert process.returncode == 0, stderr[-2000:]
            _converged(archive, baseline)
            archives += 1
            archive = baseline["root"] / f"killed-{archives}"
    print(f"killed {len(kill_points)} builds, at {kill_points} s into their work, "
          f"over {archives} archive(s)")
    assert len(kill_points) == KILLS, "too few kills landed while the builds were working"

    final = _start(baseline["run"], archive)
    _, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr[-2000:]
    _converged(archive, baseline)
