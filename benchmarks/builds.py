"""Builds of a few steps for the side-by-side benchmark (``run.py --build-steps N``).

A build is what converts a whole run, and it works differently from one ``convert``: a fetch
thread, a progress bar and a thread hashing the source files run while each step converts,
and partition files are read by a child forked once, before those threads start
(``exporter.torchfile.forked.kept_reader``). So the benchmark also times
``neox-export build --include model,optimizer`` over a run of N steps, for both layouts: the
run's ``global_step{k}/`` folders hold symbolic links to the one checkpoint's files (same bytes
in every step, read from the page cache, as the convert rows read them). Standard library
only (``run.py`` imports this module: see ``measure.py``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

LABEL = "`neox-export build --include model,optimizer`, {steps} steps"


def is_build(label: str) -> bool:
    return label.removeprefix("many intervals: ").startswith(LABEL.split(" --", 1)[0])


def run_folder(checkpoint: Path, steps: int) -> Path:
    """``<checkpoint>-run{steps}/global_step{k}/``: links to ``checkpoint``'s files."""
    root = checkpoint.with_name(f"{checkpoint.name}-run{steps}")
    for k in range(1, steps + 1):
        step = root / f"global_step{k}"
        step.mkdir(parents=True, exist_ok=True)
        for path in sorted(checkpoint.iterdir()):
            link = step / path.name
            if path.is_file() and not link.exists():
                link.symlink_to(path.resolve())
    return root


def commands(export: list[str], folders: dict[str, Path], dst: Path,
             steps: int) -> list[tuple[str, list[str], Path]]:
    """``(label, command, run folder)`` of a build of each layout (``folders``: prefix of the
    label -> checkpoint folder)."""
    out = []
    for prefix, checkpoint in folders.items():
        run = run_folder(checkpoint, steps)
        out.append((prefix + LABEL.format(steps=steps),
                    [*export, "-q", "build", str(run), "--out", str(dst), "--device", "cpu",
                     "--include", "model,optimizer"], run))
    return out


def summary(pythia: Any, many: Any, ratios: Callable[[Any, Any], tuple[float, float]],
            steps: int) -> str:
    """One sentence: both builds, per step, and how much slower the many-interval one is."""
    per_step = [r.best.seconds / steps for r in (pythia, many)]
    slower, paired = ratios(pythia, many)
    median = statistics.median(r.seconds for r in many.runs) / steps
    return (f"Builds of {steps} steps: {per_step[0]:.2f} s a step for the Pythia layout, "
            f"{per_step[1]:.2f} s for its many-interval twin (median {median:.2f} s): "
            f"{slower:.2f}x slower (paired: {paired:.2f}x), start-up included once per build.")
