"""neox-exporter: raw GPT-NeoX / DeepSpeed checkpoints as pickle-free safetensors + Parquet."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "open_archive"]


def __getattr__(name: str):  # lazy: keep `import exporter` light for the CLI
    if name == "open_archive":
        from exporter.archive.loader import open_archive

        return open_archive
    raise AttributeError(name)
