"""``build``: a whole training run into an archive (and, optionally, onto the Hub)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from exporter.archive.layout import downloads_dir
from exporter.cli.hub import LICENSE_HELP, license_option
from exporter.cli.logs import is_quiet, say, verbosity_options
from exporter.cli.options import (
    DTYPES,
    NO_STATS_HELP,
    check_out_folder,
    check_token,
    export_options,
    parse_include,
    parse_size_option,
)
from exporter.errors import SourceError

#: What a Hub repository id looks like (huggingface_hub ``validate_repo_id``: ORG/NAME).
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


@click.command()
@click.argument("source")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Archive folder (created; an existing archive is resumed).")
@click.option("--steps", default="all", show_default=True,
              help="Which steps: all, log (0 and powers of two), 1000, 1000:143000:1000, or a comma list.")
@click.option("--include", default="model,optimizer,state", show_default=True,
              callback=lambda c, p, v: parse_include(v), help="What to write for each step.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="keep", show_default=True,
              help="Cast model weights.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where casts and statistics run.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Model shard size limit.")
@click.option("--compress", default=None, metavar="zstd[:LEVEL]",
              help="Cold storage: byte-shuffled zstd tensor files (.safetensors.zst), read back by "
                   "the loader without mmap. Default: plain safetensors.")
@click.option("--no-stats", is_flag=True, help=NO_STATS_HELP)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Steps converted in parallel: local processes, or Ray tasks in flight "
                   "(set it to the cluster's task slots).")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local processes, or one Ray task per step (pip install 'neox-exporter[ray]').")
@click.option("--ray-address", default=None, help="Ray cluster to join (default: start a local one).")
@click.option("--keep-going", is_flag=True, help="Record a failing step in the manifest and go on.")
@click.option("--no-verify-existing", is_flag=True,
              help="Skip complete steps by file size only, without re-hashing them.")
@click.option("--download-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Hub sources: where a step's files are downloaded (default ARCHIVE/.downloads).")
@click.option("--max-disk", default=None,
              help="Bound on the bytes the build holds at once (e.g. 20GB): downloads, the step "
                   "converting, converted steps waiting for upload. It waits rather than exceed it.")
@click.option("--log-json", is_flag=True, help="One JSON line per step on stderr, for batch jobs.")
@click.option("--push-to", default=None, metavar="ORG/NAME",
              help="Publish to this Hub dataset as the build goes: each step's files are "
                   "uploaded once converted, whole steps committed --steps-per-commit at a time. "
                   "With --executor ray, workers upload and no storage is shared.")
@click.option("--delete-after-push", is_flag=True,
              help="With --push-to: remove a step's tensor files once uploaded (before their commit).")
@click.option("--steps-per-commit", default=10, show_default=True, type=click.IntRange(1, 10_000),
              help="With --push-to: whole steps per commit (the Hub allows about 128 commits per hour).")
@click.option("--scratch-dir", default=None,
              help="With --executor ray --push-to: each node's working folder (default "
                   "$NEOX_EXPORTER_SCRATCH or its temporary folder; about one step per task).")
@click.option("--license", "license_id", default=None, callback=license_option,
              help=f"With --push-to: {LICENSE_HELP}")
@click.option("--token", default=None, callback=check_token,
              help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`).")
@click.option("--push-model-to", default=None, metavar="ORG/NAME",
              help="After the build, publish each step as branch stepN of this model repository.")
@click.option("--tokenizer", default=None, metavar="PATH|hf://ORG/NAME",
              help="With --push-model-to: tokenizer files to add to every branch.")
@click.option("--wait", is_flag=True, help="If another command is writing --out, wait for it.")
@verbosity_options
@click.pass_context
def build(ctx: click.Context, source: str, out_dir: Path, steps: str, include: tuple[str, ...],
          dtype: str, device: str, max_shard_size: str, compress: str | None, no_stats: bool,
          workers: int, executor: str,
          ray_address: str | None, keep_going: bool, no_verify_existing: bool,
          download_dir: Path | None, max_disk: str | None, log_json: bool,
          push_to: str | None, delete_after_push: bool, steps_per_commit: int,
          scratch_dir: str | None, license_id: str | None, token: str | None,
          push_model_to: str | None, tokenizer: str | None, wait: bool) -> None:
    """Convert a whole training run into an archive: every step, indexed in Parquet.

    SOURCE is a local folder (global_stepN/ or stepN/ folders, or one checkpoint) or a Hub
    model repository whose branches are steps: hf://ORG/NAME (hf://ORG/NAME@BRANCH for the
    one step on that branch). Complete steps are skipped, so an interrupted build resumes
    where it stopped. --out must be a new or empty folder, or an archive to resume.

    \b
    Examples:
      neox-export build runs/pythia-tiny --out archive
      neox-export build hf://EleutherAI/neox-ckpt-pythia-410m-seed8 --out archive \\
          --steps 1000:143000:1000 --include model,optimizer --max-disk 20GB
    """
    from exporter.pipeline.run import BuildOptions
    from exporter.pipeline.run import build as run_build
    from exporter.sources import open_source

    check_out_folder(out_dir)
    options = export_options(include, dtype, device, max_shard_size, compress,
                             statistics=not no_stats)
    disk = parse_size_option(max_disk, "--max-disk")
    hub: dict[str, Any] = {}
    if source.startswith("hf://"):
        hub["download_dir"] = download_dir or downloads_dir(out_dir)
        hub["max_disk"] = disk
    else:
        for given, name in ((download_dir, "--download-dir"),):
            if given is not None:
                raise click.BadParameter(f"only applies to Hub sources (hf://ORG/NAME), and "
                                         f"{source} is a local folder", param_hint=name)
        _check_local_source(source)
    for given, name in ((delete_after_push, "--delete-after-push"), (license_id, "--license")):
        if given and not push_to:
            raise click.BadParameter("needs --push-to", param_hint=name)
    if delete_after_push and push_model_to:
        raise click.BadParameter("the model repository needs the weights kept",
                                 param_hint="--delete-after-push")
    if tokenizer and not push_model_to:
        raise click.BadParameter("needs --push-model-to", param_hint="--tokenizer")
    src = open_source(source, **hub)
    quiet = is_quiet() or log_json
    if push_to:
        from exporter.hub.calls import require_token

        token = require_token(token)
    from exporter.cli.hub import echo_push_event

    summary = run_build(src, out_dir, BuildOptions(
        export=options, steps=steps, workers=workers, executor=executor, ray_address=ray_address,
        keep_going=keep_going, verify_existing=not no_verify_existing, log_json=log_json,
        quiet=quiet, wait=wait, push_to=push_to, steps_per_commit=steps_per_commit,
        delete_after_push=delete_after_push, on_push_event=None if quiet else echo_push_event,
        max_disk=disk, scratch_dir=scratch_dir, push_token=token, push_license=license_id,
        push_model_repo=push_model_to))
    if summary.push is not None and not quiet:
        click.echo(f"pushed: {summary.push.url}")
    if push_model_to and not summary.count("failed"):
        from exporter.cli.hub import push_model_to as publish_model

        publish_model(out_dir, push_model_to, dataset_repo=push_to, tokenizer=tokenizer,
                      token=token, quiet=quiet)
    if log_json:
        click.echo(json.dumps({"event": "summary", "steps_done": summary.count("done"),
                               "steps_skipped": summary.count("skipped"),
                               "steps_failed": summary.count("failed"),
                               "bytes_in": summary.bytes_in, "bytes_out": summary.bytes_out,
                               "seconds": summary.seconds}))
    else:
        say(f"archive: {out_dir}")
        say(summary.table())
    if summary.count("failed"):
        if quiet and not log_json:  # -q hides the table that names them
            for outcome in summary.outcomes:
                if outcome.status == "failed":
                    click.echo(f"neox-export: error: step {outcome.step}: {outcome.error}", err=True)
        ctx.exit(1)


def _check_local_source(source: str) -> None:
    """A missing local SOURCE that reads as ORG/NAME most likely meant the Hub repository."""
    if Path(source).exists():
        return
    if _REPO_ID.match(source):
        raise SourceError(f"{source}: no such folder; for the Hub repository write hf://{source}")
    raise SourceError(f"{source}: no such folder (give a run folder, one checkpoint folder, "
                      f"or hf://ORG/NAME)")

