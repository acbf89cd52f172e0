"""Paths of the archive layout (DESIGN.md "Archive layout") and atomic file writes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return root / "steps" / f"step{step}"


def tensor_index_path(root: Path, step: int) -> Path:
    return root / "index" / "tensors" / f"step{step}.parquet"


def checkpoint_index_path(root: Path, step: int) -> Path:
    return root / "index" / "checkpoints" / f"step{step}.parquet"


def manifest_path(root: Path) -> Path:
    return root / "manifest.json"


def indexed_steps(root: Path) -> list[int]:
    """Steps that have both index shards."""
    folder = root / "index" / "tensors"
    if not folder.is_dir():
        return []
    steps = []
    for path in folder.glob("step*.parquet"):
        m = re.match(r"^step(\d+)\.parquet$", path.name)
        if m and checkpoint_index_path(root, int(m[1])).exists():
            steps.append(int(m[1]))
    return sorted(steps)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a leftover temporary of an interrupted write."""
    return path.name.startswith(".") and (".tmp-" in path.name or ".partial-" in path.name)
