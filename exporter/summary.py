"""Summaries of ``.pt`` files and checkpoint folders, read without executing any pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.errors import ExporterError
from exporter.torchfile import load_torch_file


def inspect_file(path: Path) -> dict[str, Any]:
    """Tensors, top-level keys and pickled globals of one ``.pt`` file."""
    tf = load_torch_file(path)
    tensors = [
        {"key": key, "dtype": str(ref.dtype).removeprefix("torch."), "shape": list(ref.shape),
         "bytes": ref.nbytes}
        for key, ref in tf.tensors()
    ]
    keys = []
    if isinstance(tf.obj, dict):
        keys = [str(k) for k in tf.obj]
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "root": type(tf.obj).__name__,
        "keys": keys,
        "tensors": tensors,
        "tensor_bytes": sum(t["bytes"] for t in tensors),
        "globals": [{"name": n, "known": k} for n, k in tf.globals.items()],
    }


def inspect_path(path: str | Path) -> dict[str, Any]:
    """``inspect_file`` for a file, or for every ``.pt`` file of a folder (errors per file)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.pt") if p.is_file())
        if not files:
            raise ExporterError(f"{path}: no .pt files")
    else:
        raise ExporterError(f"{path}: no such file or folder")
    reports, errors = [], []
    for file in files:
        try:
            reports.append(inspect_file(file))
        except ExporterError as exc:
            errors.append({"file": str(file), "error": str(exc)})
    names: dict[str, bool] = {}
    for report in reports:
        for g in report["globals"]:
            names[g["name"]] = g["known"]
    others = sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.suffix != ".pt"
    ) if path.is_dir() else []
    return {
        "path": str(path),
        "files": reports,
        "errors": errors,
        "other_files": others,
        "globals": [{"name": n, "known": k} for n, k in names.items()],
        "unknown_globals": [n for n, k in names.items() if not k],
    }
