"""Options shared by several commands: parsing and checking what the user typed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from exporter.errors import ExporterError, OptionsError

DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_include(value: str) -> tuple[str, ...]:
    from exporter.pipeline.export import INCLUDE_CHOICES

    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in parts if p not in INCLUDE_CHOICES]
    if bad or not parts:
        raise click.BadParameter(f"choose from {', '.join(INCLUDE_CHOICES)} (comma-separated)")
    return parts


def dtype_option(name: str) -> Any:
    """The element type ``--dtype NAME`` asks an export for, or None (keep the source's)."""
    from exporter.dtypes import BY_NAME

    return None if DTYPES[name] is None else BY_NAME[DTYPES[name]]


def torch_dtype(name: str) -> Any:
    """The ``torch.dtype`` ``--dtype NAME`` asks a sample for, or None (imports torch)."""
    dtype = dtype_option(name)
    return None if dtype is None else dtype.torch


def device_option(value: str) -> str:
    from exporter.convert.gpu import cuda_available

    if value == "auto":
        return "cuda" if cuda_available() else "cpu"
    if value == "cuda" and not cuda_available():
        raise click.BadParameter("no CUDA device is available")
    return value


def export_options(include: tuple[str, ...], dtype: str, device: str, max_shard_size: str,
                    compress: str | None = None, statistics: bool = True) -> Any:
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
    return ExportOptions(include=include, dtype=dtype_option(dtype), device=device_option(device),
                         max_shard_size=shard, compress_level=level, statistics=statistics)


NO_STATS_HELP = "Skip per-tensor statistics (their index columns are null): files only, faster."


def check_out_folder(out_dir: Path, option: str = "--out") -> None:
    """``out_dir`` must be a folder or not exist yet (a file there ends in `[Errno 20]` later)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise click.BadParameter(f"{out_dir} is a file; give a folder (it is created if missing)",
                                 param_hint=option)


def check_new_folder(out_dir: Path, param_hint: str) -> None:
    """``out_dir`` must not exist, or be an empty folder: nothing of the user's is overwritten."""
    check_out_folder(out_dir, param_hint)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise click.BadParameter(f"{out_dir} exists and is not empty; give a new folder, or delete "
                                 f"this one first", param_hint=param_hint)


def check_checkpoint_folder(folder: Path, out_dir: Path) -> None:
    """A folder of step folders is a run, which ``build`` converts, not ``convert``."""
    from exporter.neox.checkpoint import holds_checkpoint
    from exporter.sources.local import STEP_FOLDER

    if holds_checkpoint(folder):
        return
    steps = sorted((int(m[1]), child.name) for child in folder.iterdir()
                   if child.is_dir() and (m := STEP_FOLDER.match(child.name)))
    if steps:
        names = ", ".join(name for _, name in steps[:3]) + (" ..." if len(steps) > 3 else "")
        raise ExporterError(
            f"{folder} holds a training run ({len(steps)} step folders: {names}), not one "
            f"checkpoint: convert the run with `neox-export build {folder} --out {out_dir}`, or "
            f"one step with `neox-export convert {folder / steps[-1][1]} --out {out_dir}`")


def parse_size_option(value: str | None, option: str) -> int | None:
    """A size such as 20GB or 500MiB, as bytes; a usage error naming ``option`` otherwise."""
    from exporter.convert.sharding import parse_size

    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
    if size <= 0:
        raise click.BadParameter(f"must be more than 0 bytes, got {value!r}", param_hint=option)
    return size


def check_token(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--token``: None (find one) or a usable token (an empty one ends in `Illegal header value`)."""
    from exporter.hub.calls import check_token_text

    if value is None:
        return None
    try:
        return check_token_text(value)
    except OptionsError as exc:
        raise click.BadParameter(str(exc)) from None
