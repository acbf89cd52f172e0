"""neox-exporter: raw GPT-NeoX / DeepSpeed checkpoints as pickle-free safetensors + Parquet."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
