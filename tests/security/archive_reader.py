"""Read everything an archive offers, through every public reader, and keep what came back.

:func:`read_everything` is what a user of a downloaded archive can do: open it, list steps,
read the index tables, every tensor of the index, every step's state dicts, ``state.json``
and model folder (and the files ``from_pretrained`` would read from it: its
``model.safetensors.index.json`` shards included). It keeps every byte returned, and every
:class:`~exporter.errors.ExporterError`; any other exception propagates (a test failure).

``cd tests && python -m security.archive_reader FOLDER MARKER`` reads each ``FOLDER/<case>/archive`` and
runs ``verify`` on it in a process whose address space is capped, one JSON line per case.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from exporter import open_archive
from exporter.archive.push_state import deleted_after_push
from exporter.errors import ExporterError
from exporter.records import KINDS
from exporter.verify import verify_path
from security.bombs import cap_address_space

T = TypeVar("T")
#: address space a reading process may add to what it holds after its imports


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _folder_bytes(folder: Path) -> list[bytes]:
    """What ``from_pretrained(folder)`` reads: config, weights, and the shards the index names."""
    out = [p.read_bytes() for p in sorted(folder.iterdir())
           if p.is_file() and (p.name == "config.json" or p.name.startswith("model"))]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for file in set(json.loads(index.read_text())["weight_map"].values()):
            target = folder / file
            if target.is_file():
                out.append(target.read_bytes())
    return out


def read_everything(location: str | Path, root: Path | None = None,
                    steps: tuple[int, ...] = (0, 8)) -> tuple[list[bytes], list[ExporterError]]:
    """Everything ``open_archive(location)`` hands out, and the project errors it raised.

    ``root``: the local folder, for the readers that work on folders only (``.push`` records).
    """
    out: list[bytes] = []
    errors: list[ExporterError] = []

    def attempt(read: Callable[[], T]) -> T | None:
        try:
            return read()
        except ExporterError as exc:
            errors.append(exc)
            return None

    archive = attempt(lambda: open_archive(location))
    if archive is None:
        return out, errors
    manifest = attempt(lambda: archive.manifest)
    out.append(json.dumps(manifest).encode())
    for table in (attempt(lambda: archive.index.to_table()), attempt(lambda: archive.checkpoints)):
        if table is not None:
            out.append(repr(table.to_pylist()).encode())
    index = attempt(lambda: archive.index.to_table())
    rows = index.to_pylist() if index is not None else []
    kinds = sorted({row["kind"] for row in rows} & set(KINDS)) or ["model"]
    for row in rows:
        tensor = attempt(lambda row=row: archive.tensor(row["step"], row["name"], row["kind"]))
        if tensor is not None:
            out.append(tensor_bytes(tensor))
    for step in steps:
        for kind in kinds:
            tensors = attempt(lambda step=step, kind=kind: archive.state_dict(step, kind))
            out += [tensor_bytes(t) for t in (tensors or {}).values()]
        out.append(json.dumps(attempt(lambda step=step: archive.state(step))).encode())
        folder = attempt(lambda step=step: archive.model_path(step))
        if folder is not None and folder.is_dir():
            out += _folder_bytes(folder)
        if root is not None:
            out.append(repr(attempt(lambda step=step: deleted_after_push(root, step))).encode())
    return out, errors


def verify_text(root: Path) -> tuple[str, list[ExporterError]]:
    """The text of ``verify`` on the archive, or the project error it raised."""
    try:
        return "\n".join(r.text() for r in verify_path(root)), []
    except ExporterError as exc:
        return "", [exc]


def run_case(folder: Path, marker: bytes) -> dict[str, Any]:
    """Read and verify one case folder; what came back, summarised for the parent test."""
    start = time.perf_counter()
    root = folder / "archive"
    try:
        out, errors = read_everything(root, root)
        text, failed = verify_text(root)
        outcome = "ok"
    except BaseException as exc:  # noqa: BLE001 - reported; the parent test fails on it
        return {"name": folder.name, "outcome": f"crash:{type(exc).__name__}",
                "message": str(exc)[:500], "seconds": time.perf_counter() - start}
    return {"name": folder.name, "outcome": outcome,
            "errors": [str(e) for e in errors + failed],
            "marker": any(marker in b for b in out) or marker.decode() in text,
            "seconds": time.perf_counter() - start,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    folder, marker = Path(args[0]), args[1].encode()
    cap = cap_address_space()
    print(json.dumps({"address_space_cap": cap}), flush=True)
    for case in sorted(os.listdir(folder)):
        print(json.dumps(run_case(folder / case, marker)), flush=True)


if __name__ == "__main__":
    main()
