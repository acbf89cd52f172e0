"""Options shared by several commands: parsing and checking what the user typed."""

from __future__ import annotations

from typing import Any

import click

from exporter.errors import ExporterError

DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_include(value: str) -> tuple[str, ...]:
    from exporter.pipeline.export import INCLUDE_CHOICES

    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in parts if p not in INCLUDE_CHOICES]
    if bad or not parts:
        raise click.BadParameter(f"choose from {', '.join(INCLUDE_CHOICES)} (comma-separated)")
    return parts


def torch_dtype(name: str) -> Any:
    import torch

    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


def device_option(value: str) -> str:
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is available")
    return value


def export_options(include: tuple[str, ...], dtype: str, device: str, max_shard_size: str,
                    compress: str | None = None) -> Any:
    from exporter.convert.compress import parse_compression
    from exporter.convert.sharding import parse_size
    from exporter.pipeline.export import ExportOptions

    try:
        shard = parse_size(max_shard_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-shard-size") from exc
    try:
        level = parse_compression(compress) if compress else None
    except ExporterError as exc:
        raise click.BadParameter(str(exc), param_hint="--compress") from exc
    return ExportOptions(include=include, dtype=torch_dtype(dtype), device=device_option(device),
                         max_shard_size=shard, compress_level=level)
