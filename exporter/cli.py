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

from exporter import __version__
from exporter.errors import ExporterError

DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
log = logging.getLogger("exporter")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
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


def _torch_dtype(name: str) -> Any:
    import torch

    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


def _device(value: str) -> str:
    import torch

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
        if report["errors"]:
            raise ExporterError(f"{len(report['errors'])} file(s) could not be read")
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
@click.option("--compress", default=None, metavar="zstd[:LEVEL]",
              help="Cold storage: byte-shuffled zstd tensor files (.safetensors.zst), read back by "
                   "the loader without mmap. Default: plain safetensors.")
@click.option("--no-stats", is_flag=True,
              help="Skip per-tensor statistics (their index columns are null): files only.")
def convert(checkpoint: Path, out_dir: Path, include: tuple[str, ...], dtype: str, device: str,
            max_shard_size: str, compress: str | None, no_stats: bool) -> None:
    """Convert one checkpoint folder to safetensors + JSON.

    Writes model.safetensors under Hugging Face GPTNeoX names with config.json (loadable by
    transformers.GPTNeoXForCausalLM.from_pretrained), optimizer/{master,exp_avg,exp_avg_sq}
    .safetensors, state.json / state.safetensors and the source YAML.

    Example: neox-export convert checkpoints/global_step1000 --out hf/step1000 --dtype bf16
    """
    from exporter.export import export_checkpoint
    from exporter.progress import byte_bar

    options = _export_options(include, dtype, device, max_shard_size, compress)
    options.statistics = not no_stats
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


@cli.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(path: Path) -> None:
    """Check a checkpoint folder, an exported step folder, or a whole archive.

    For every parameter the fp32 master weight cast to the model dtype must equal the model
    weight bitwise; ZeRO partition sizes must add up with their padding; nothing in the
    source may be left out; exported tensors must match the sha256s in the index. Exits 1
    on any failure, naming the tensor.

    Example: neox-export verify checkpoints/global_step1000
    """
    from exporter.verify import verify_path

    reports = verify_path(path)
    for report in reports:
        click.echo(report.text())
    failed = [r for r in reports if not r.ok]
    if failed:
        raise ExporterError(f"verification failed for {len(failed)} of {len(reports)} target(s)")
    click.echo(f"all checks passed ({len(reports)} target(s))")


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", type=click.Choice(["tiny", "160m", "410m"]), default="tiny", show_default=True,
              help="Model shape: tiny (trained for real), or Pythia-160M/410M-shaped (random values).")
@click.option("--steps", default="0,1,2,4,8", show_default=True, help="Checkpoint steps to write.")
@click.option("--dp", default=2, show_default=True, type=click.IntRange(1, 1024),
              help="Data-parallel ZeRO partitions per checkpoint.")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(1, 64), help="Tensor-parallel ranks.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--bucket-elements", type=click.IntRange(1), default=None,
              help="DeeperSpeed's max_elements_per_comm (GPT-NeoX reduce_bucket_size); small values "
                   "cut the ZeRO groups into many comm intervals. Default: Pythia's 5e8.")
def sample(out_dir: Path, shape: str, steps: str, dp: int, tp: int, dtype: str,
           bucket_elements: int | None) -> None:
    """Write a sample GPT-NeoX run in the Pythia-era layout (to try the tool, or to benchmark).

    The tiny shape runs a few real training steps; 160m/410m write Pythia-shaped checkpoints
    with random values (about 2.2 GB / 5.7 GB each).

    Example: neox-export sample runs/tiny && neox-export build runs/tiny --out archive
    """
    from exporter.samples import (
        PYTHIA_160M,
        PYTHIA_410M,
        TINY,
        RunConfig,
        tiny_run_config,
        write_checkpoint,
        write_run,
    )

    try:
        step_list = sorted({int(s) for s in steps.split(",") if s.strip()})
    except ValueError as exc:
        raise click.BadParameter("a comma-separated list of step numbers", param_hint="--steps") from exc
    torch_dtype = _torch_dtype(dtype)
    bucket = {} if bucket_elements is None else {"max_elements_per_comm": bucket_elements}
    if shape == "tiny":
        write_run(out_dir, TINY, steps=step_list, dp=dp, tp=tp, dtype=torch_dtype,
                  config=tiny_run_config(max(step_list) or 1, **bucket))
    else:
        model = PYTHIA_160M if shape == "160m" else PYTHIA_410M
        for step in step_list:
            write_checkpoint(out_dir / f"step{step}", model, step=step, dp=dp, tp=tp, dtype=torch_dtype,
                             config=RunConfig(**bucket))
    click.echo(f"wrote {len(step_list)} checkpoint(s) to {out_dir}")


def _export_options(include: tuple[str, ...], dtype: str, device: str, max_shard_size: str,
                    compress: str | None = None) -> Any:
    from exporter.convert.compress import parse_compression
    from exporter.convert.sharding import parse_size
    from exporter.export import ExportOptions

    try:
        shard = parse_size(max_shard_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-shard-size") from exc
    try:
        level = parse_compression(compress) if compress else None
    except ExporterError as exc:
        raise click.BadParameter(str(exc), param_hint="--compress") from exc
    return ExportOptions(include=include, dtype=_torch_dtype(dtype), device=_device(device),
                         max_shard_size=shard, compress_level=level)


@cli.command()
@click.argument("source")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Archive folder (created; an existing archive is resumed).")
@click.option("--steps", default="all", show_default=True,
              help="Which steps: all, log (0 and powers of two), 1000, 1000:143000:1000, or a comma list.")
@click.option("--include", default="model,optimizer,state", show_default=True,
              callback=lambda c, p, v: _include(v), help="What to write for each step.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="keep", show_default=True,
              help="Cast model weights.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where casts and statistics run.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Model shard size limit.")
@click.option("--compress", default=None, metavar="zstd[:LEVEL]",
              help="Cold storage: byte-shuffled zstd tensor files (.safetensors.zst), read back by "
                   "the loader without mmap. Default: plain safetensors.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Steps converted in parallel.")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local processes, or one Ray task per step (pip install 'neox-exporter[ray]').")
@click.option("--ray-address", default=None, help="Ray cluster to join (default: start a local one).")
@click.option("--keep-going", is_flag=True, help="Record a failing step in the manifest and go on.")
@click.option("--no-verify-existing", is_flag=True,
              help="Skip complete steps by file size only, without re-hashing them.")
@click.option("--download-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Hub sources: where a step's files are downloaded (default ARCHIVE/.downloads).")
@click.option("--max-disk", default=None, help="Hub sources: bound on downloaded bytes held at once (e.g. 20GB).")
@click.option("--log-json", is_flag=True, help="One JSON line per step on stderr, for batch jobs.")
@click.option("--push-to", default=None, metavar="ORG/NAME",
              help="Publish each finished step to this Hub dataset as the build goes.")
@click.option("--delete-after-push", is_flag=True,
              help="With --push-to: remove a step's safetensors once the Hub holds them.")
@click.pass_context
def build(ctx: click.Context, source: str, out_dir: Path, steps: str, include: tuple[str, ...],
          dtype: str, device: str, max_shard_size: str, compress: str | None, workers: int, executor: str,
          ray_address: str | None, keep_going: bool, no_verify_existing: bool,
          download_dir: Path | None, max_disk: str | None, log_json: bool,
          push_to: str | None, delete_after_push: bool) -> None:
    """Convert a whole training run into an archive: every step, indexed in Parquet.

    SOURCE is a local folder (global_stepN/ or stepN/ folders, or one checkpoint) or a Hub
    model repository whose branches are steps: hf://ORG/NAME. Complete steps are skipped,
    so an interrupted build resumes where it stopped.

    \b
    Examples:
      neox-export build runs/pythia-tiny --out archive
      neox-export build hf://EleutherAI/neox-ckpt-pythia-410m-seed8 --out archive \\
          --steps 1000:143000:1000 --include model,optimizer --max-disk 20GB
    """
    from exporter.pipeline import BuildOptions
    from exporter.pipeline import build as run_build
    from exporter.sources import open_source

    options = _export_options(include, dtype, device, max_shard_size, compress)
    hub: dict[str, Any] = {}
    if source.startswith("hf://"):
        from exporter.convert.sharding import parse_size

        hub["download_dir"] = download_dir or out_dir / ".downloads"
        hub["max_disk"] = parse_size(max_disk) if max_disk else None
    if delete_after_push and not push_to:
        raise click.BadParameter("needs --push-to", param_hint="--delete-after-push")
    src = open_source(source, **hub)
    quiet = ctx.obj["quiet"] or log_json
    hook = None
    if push_to:
        from exporter.commands_hub import echo_push_event
        from exporter.publish import make_push_hook

        hook = make_push_hook(out_dir, push_to, delete_after_push=delete_after_push,
                              progress=None if quiet else echo_push_event)
    summary = run_build(src, out_dir, BuildOptions(
        export=options, steps=steps, workers=workers, executor=executor, ray_address=ray_address,
        keep_going=keep_going, verify_existing=not no_verify_existing, log_json=log_json,
        quiet=quiet, on_step_done=hook))
    if hook is not None:
        click.echo(f"pushed: {hook.flush().url}")
    if log_json:
        click.echo(json.dumps({"event": "summary", "steps_done": summary.count("done"),
                               "steps_skipped": summary.count("skipped"),
                               "steps_failed": summary.count("failed"),
                               "bytes_in": summary.bytes_in, "bytes_out": summary.bytes_out,
                               "seconds": summary.seconds}))
    else:
        click.echo(f"archive: {out_dir}")
        click.echo(summary.table())
    if summary.count("failed"):
        ctx.exit(1)


def _register() -> None:
    from exporter.commands_hub import plot, push

    cli.add_command(push)
    cli.add_command(plot)


_register()


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
