"""The ``neox-export`` command: a thin shell over the library.

Each command parses its options, calls one library function and prints the result; every
:class:`~exporter.errors.ExporterError` becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
import torch

from exporter import __version__
from exporter.errors import ExporterError

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("exporter")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="neox-export")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Turn raw GPT-NeoX / DeepSpeed checkpoints into pickle-free safetensors + Parquet.

    No command ever executes code from a pickle: .pt files are read by a restricted reader
    that turns tensors into byte ranges and unknown objects into inert records.
    """
    _setup_logging(verbose, quiet)
    ctx.obj = {"quiet": quiet}


def _include(value: str) -> tuple[str, ...]:
    from exporter.export import INCLUDE_CHOICES

    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in parts if p not in INCLUDE_CHOICES]
    if bad or not parts:
        raise click.BadParameter(f"choose from {', '.join(INCLUDE_CHOICES)} (comma-separated)")
    return parts


def _device(value: str) -> str:
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is available")
    return value


@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Summarise a .pt file or a checkpoint folder without executing any pickle.

    Lists each file's tensors (dtype, shape, bytes), its top-level keys, and every global
    its pickle names; globals the reader does not know are flagged with '!'.

    Example: neox-export inspect checkpoints/step1000
    """
    from exporter.summary import inspect_path

    report = inspect_path(path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for f in report["files"]:
        click.echo(f"{f['file']}  ({f['bytes']:,} bytes, {len(f['tensors'])} tensors, "
                   f"{f['tensor_bytes']:,} tensor bytes)")
        if f["keys"]:
            click.echo(f"  keys: {', '.join(f['keys'])}")
        for t in f["tensors"][:50]:
            click.echo(f"  {t['key']:<60} {t['dtype']:<9} {str(t['shape']):<20} {t['bytes']:,}")
        if len(f["tensors"]) > 50:
            click.echo(f"  ... {len(f['tensors']) - 50} more tensors (use --json)")
    for err in report["errors"]:
        click.echo(f"{err['file']}: ERROR {err['error']}")
    click.echo("globals named by the pickles:")
    for g in report["globals"]:
        click.echo(f"  {' ' if g['known'] else '!'} {g['name']}")
    if report["unknown_globals"]:
        click.echo(f"{len(report['unknown_globals'])} unknown global(s), kept as inert records (!)")
    if report["errors"]:
        raise ExporterError(f"{len(report['errors'])} file(s) could not be read")


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (created; must be empty if it exists).")
@click.option("--include", default="model,optimizer,state", show_default=True, callback=lambda c, p, v: _include(v),
              help="What to write: model weights, optimizer (ZeRO master weights + Adam moments), state.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="keep", show_default=True,
              help="Cast model weights (round-to-nearest-even, as torch's cast).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where casts and statistics run.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Split model.safetensors into shards above this size, as transformers does.")
def convert(checkpoint: Path, out_dir: Path, include: tuple[str, ...], dtype: str, device: str,
            max_shard_size: str) -> None:
    """Convert one checkpoint folder to safetensors + JSON.

    Writes model.safetensors under Hugging Face GPTNeoX names with config.json (loadable by
    transformers.GPTNeoXForCausalLM.from_pretrained), optimizer/{master,exp_avg,exp_avg_sq}
    .safetensors, state.json / state.safetensors and the source YAML.

    Example: neox-export convert checkpoints/global_step1000 --out hf/step1000 --dtype bf16
    """
    from exporter.convert.sharding import parse_size
    from exporter.export import ExportOptions, export_checkpoint
    from exporter.progress import byte_bar

    try:
        shard = parse_size(max_shard_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-shard-size") from exc
    options = ExportOptions(include=include, dtype=DTYPES[dtype], device=_device(device),
                            max_shard_size=shard)
    quiet = click.get_current_context().obj["quiet"]
    with byte_bar(f"convert {checkpoint.name}", disable=quiet) as advance:
        result = export_checkpoint(checkpoint, out_dir, options, progress=advance)
    kinds: dict[str, int] = {}
    for r in result.records:
        kinds[r.job.kind] = kinds.get(r.job.kind, 0) + 1
    click.echo(f"wrote {out_dir}: {len(result.records)} tensors "
               f"({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
               f"{result.bytes_in / 1e6:.1f} MB in, {result.bytes_out / 1e6:.1f} MB out, "
               f"{result.seconds:.1f} s")


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: runs the CLI, turning library errors into one line + exit 1."""
    try:
        return cli.main(args=argv, prog_name="neox-export", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except ExporterError as exc:
        click.echo(f"neox-export: error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"neox-export: error: {exc}", err=True)
        sys.exit(1)
