"""``inspect``, ``convert``, ``verify`` and ``sample``: commands on one checkpoint or folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from exporter.cli.logs import is_quiet, say, verbosity_options
from exporter.cli.options import (
    DTYPES,
    NO_STATS_HELP,
    check_checkpoint_folder,
    check_new_folder,
    check_out_folder,
    export_options,
    parse_include,
    torch_dtype,
)
from exporter.errors import ExporterError

#: The last export's result, kept until the process ends: the command line exits without
#: tearing the interpreter down (:func:`exporter.cli.main.run`), and freeing a many-interval
#: checkpoint's plan (some 300,000 tensor records) as the command returned took 0.05-0.09 s
#: of its export.
_KEPT: list[object] = []


@click.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@verbosity_options
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


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (created; must be empty if it exists).")
@click.option("--include", default="model,optimizer,state", show_default=True, callback=lambda c, p, v: parse_include(v),
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
@click.option("--no-stats", is_flag=True, help=NO_STATS_HELP)
@verbosity_options
def convert(checkpoint: Path, out_dir: Path, include: tuple[str, ...], dtype: str, device: str,
            max_shard_size: str, compress: str | None, no_stats: bool) -> None:
    """Convert one checkpoint folder to safetensors + JSON.

    Writes model.safetensors under Hugging Face GPTNeoX names with config.json (loadable by
    transformers.GPTNeoXForCausalLM.from_pretrained), optimizer/{master,exp_avg,exp_avg_sq}
    .safetensors, state.json / state.safetensors and the source YAML.

    A folder of step folders (a whole run) is converted with `neox-export build` instead.

    Example: neox-export convert checkpoints/global_step1000 --out hf/step1000 --dtype bf16
    """
    from exporter.pipeline.export import export_checkpoint
    from exporter.pipeline.progress import byte_bar

    check_checkpoint_folder(checkpoint, out_dir)
    check_out_folder(out_dir)
    options = export_options(include, dtype, device, max_shard_size, compress,
                             statistics=not no_stats)
    with byte_bar(f"convert {checkpoint.name}", disable=is_quiet()) as advance:
        result = export_checkpoint(checkpoint, out_dir, options, progress=advance)
    _KEPT[:] = [result]
    kinds: dict[str, int] = {}
    for r in result.records:
        kinds[r.job.kind] = kinds.get(r.job.kind, 0) + 1
    say(f"wrote {out_dir}: {len(result.records)} tensors "
               f"({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
               f"{result.bytes_in / 1e6:.1f} MB in, {result.bytes_out / 1e6:.1f} MB out, "
               f"{result.seconds:.1f} s")


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@verbosity_options
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


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", type=click.Choice(["tiny", "160m", "410m"]), default="tiny", show_default=True,
              help="Model shape: tiny (trained for real), or Pythia-160M/410M-shaped (random values).")
@click.option("--steps", default="0,1,2,4,8", show_default=True, help="Checkpoint steps to write.")
@click.option("--dp", default=2, show_default=True, type=click.IntRange(1, 1024),
              help="Data-parallel ZeRO partitions per checkpoint.")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(1, 64), help="Tensor-parallel ranks.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**31 - 1),
              help="Training seed (GPT-NeoX `seed`: weight init and data order); runs that differ "
                   "only in it, as the PolyPythias seeds do, have different weights.")
@click.option("--bucket-elements", type=click.IntRange(1), default=None,
              help="DeeperSpeed's max_elements_per_comm (GPT-NeoX reduce_bucket_size); small values "
                   "cut the ZeRO groups into many comm intervals. Default: Pythia's 5e8.")
@verbosity_options
def sample(out_dir: Path, shape: str, steps: str, dp: int, tp: int, dtype: str, seed: int,
           bucket_elements: int | None) -> None:
    """Write a sample GPT-NeoX run in the Pythia-era layout (to try the tool, or to benchmark).

    The tiny shape runs a few real training steps; 160m/410m write Pythia-shaped checkpoints
    with random values (about 2.2 GB / 5.7 GB each). OUT_DIR must not exist or be empty.

    Example: neox-export sample runs/tiny && neox-export build runs/tiny --out archive

    Seeds side by side: neox-export sample runs/tiny-seed1 --seed 1
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
    check_new_folder(out_dir, "OUT_DIR")
    sample_dtype = torch_dtype(dtype)
    bucket = {} if bucket_elements is None else {"max_elements_per_comm": bucket_elements}
    if shape == "tiny":
        write_run(out_dir, TINY, steps=step_list, dp=dp, tp=tp, dtype=sample_dtype, seed=seed,
                  config=tiny_run_config(max(step_list) or 1, **bucket))
    else:
        model = PYTHIA_160M if shape == "160m" else PYTHIA_410M
        for step in step_list:
            write_checkpoint(out_dir / f"step{step}", model, step=step, dp=dp, tp=tp,
                             dtype=sample_dtype, seed=seed, config=RunConfig(**bucket))
    say(f"wrote {len(step_list)} checkpoint(s) to {out_dir}")
