"""neox-exporter: raw GPT-NeoX / DeepSpeed checkpoints as pickle-free safetensors + Parquet.

One function per job, each documented with an example:

- :func:`export_checkpoint`: one checkpoint folder -> one step folder;
- :func:`build`: every step of a run -> an archive (resumable);
- :func:`verify_path`: check a checkpoint, a step folder or an archive;
- :func:`push_archive`: publish an archive as a Hub dataset;
- :func:`open_archive`: read tensors back, memory-mapped, no pickle;
- :func:`open_catalog`: many runs side by side (``neox-export catalog``): cross-run statistics
  from one index, each run's archive by name.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "BuildOptions",
    "ExportOptions",
    "__version__",
    "build",
    "export_checkpoint",
    "open_archive",
    "open_catalog",
    "open_source",
    "push_archive",
    "verify_path",
]

# Imported on first use: `import exporter` stays light for the CLI.
_LAZY = {
    "open_archive": "exporter.archive.loader",
    "open_catalog": "exporter.catalog.reader",
    "build": "exporter.pipeline.run",
    "BuildOptions": "exporter.pipeline.run",
    "export_checkpoint": "exporter.pipeline.export",
    "ExportOptions": "exporter.pipeline.export",
    "open_source": "exporter.sources",
    "push_archive": "exporter.hub.push",
    "verify_path": "exporter.verify",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'exporter' has no attribute {name!r}")
