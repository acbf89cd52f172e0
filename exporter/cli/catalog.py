"""``catalog``, ``compare`` and ``deltas``: many runs side by side (thin shells over
:mod:`exporter.catalog`)."""

from __future__ import annotations

from pathlib import Path

import click

from exporter.cli.logs import is_quiet, say, verbosity_options
from exporter.errors import CatalogError
from exporter.records import KINDS


def _step_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return sorted({int(s) for s in value.split(",") if s.strip()})
    except ValueError:
        raise click.BadParameter("a comma-separated list of step numbers", param_hint="--steps") from None


@click.command("catalog")
@click.argument("archives", nargs=-1)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Catalog folder (created; updated in place when it exists).")
@click.option("--run", "run_overrides", multiple=True, metavar="NAME=FIELD=VALUE[,FIELD=VALUE]",
              help="Set a run's metadata: FIELD is run (rename), model_size, seed or variant "
                   "(standard, data-seed, weight-seed). NAME is the run name or the archive as "
                   "given. Repeatable; remembered when the run is re-indexed.")
@click.option("--refresh", is_flag=True,
              help="Also re-check every run already in the catalog; re-index those whose "
                   "archive changed (a new Hub commit, a rebuilt local archive).")
@click.option("--push-to", default=None, metavar="ORG/NAME",
              help="Publish the catalog as this Hub dataset afterwards.")
@click.option("--private", is_flag=True, help="With --push-to: create the repository private.")
@click.option("--license", "license_id", default="apache-2.0", show_default=True,
              help="License identifier for the catalog's card.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
@verbosity_options
def catalog(archives: tuple[str, ...], out: Path, run_overrides: tuple[str, ...], refresh: bool,
            push_to: str | None, private: bool, license_id: str, token: str | None) -> None:
    """Index many run archives side by side in one small dataset (no tensors).

    ARCHIVES are archive folders or Hub datasets (hf://datasets/ORG/NAME[@REVISION]). Each
    becomes a run with its model size, seed and variant (read from the source name, e.g.
    neox-ckpt-pythia-410m-seed8, and the GPT-NeoX config; override them with --run). Adding
    runs is incremental: runs whose archive is unchanged are not read again. A run that cannot
    be reached keeps its indexed rows.

    Example: neox-export catalog hf://datasets/me/pythia-410m-seed1 hf://datasets/me/pythia-410m-seed2 --out seeds
    """
    from exporter.catalog.build import build_catalog
    from exporter.catalog.members import parse_override

    overrides: dict[str, dict[str, object]] = {}
    for text in run_overrides:
        key, fields = parse_override(text)
        overrides.setdefault(key, {}).update(fields)
    update = build_catalog(out, archives, overrides=overrides, refresh=refresh,
                           license=license_id, progress=None if is_quiet() else say)
    for run, reason in update.unreachable.items():
        click.echo(f"warning: run {run}: archive unreachable ({reason}); answering from its "
                   "indexed rows", err=True)
    say(f"{out}: {len(update.added)} added, {len(update.reindexed)} re-indexed, "
               f"{len(update.unchanged)} unchanged, {len(update.relabelled)} relabelled")
    if push_to:
        from exporter.catalog.push import push_catalog
        from exporter.cli.hub import echo_push_event

        result = push_catalog(out, push_to, private=private, token=token, license=license_id,
                              progress=None if is_quiet() else echo_push_event)
        say(f"{result.url}: {len(result.commits)} commit(s)")
    if update.failed:
        raise CatalogError(f"{len(update.failed)} member(s) not added: "
                           + "; ".join(f"{k}: {v}" for k, v in update.failed.items()))


@click.command()
@click.argument("catalog_location", metavar="CATALOG")
@click.option("--runs", required=True, metavar="A,B", help="The two runs to compare (A is the "
              "reference of the relative distance).")
@click.option("--kind", default="model", show_default=True, type=click.Choice(KINDS),
              help="Which tensors: model weights, optimizer state, buffers, engine state.")
@click.option("--match", default=None, help="Glob over tensor names (default: every tensor).")
@click.option("--steps", default=None, help="Comma-separated steps (default: every common step).")
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Parquet file (default: index/compare/ in the catalog, linked by its card).")
@click.option("--revision", default=None, help="Hub catalogs: branch or commit.")
@verbosity_options
def compare(catalog_location: str, runs: str, kind: str, match: str | None, steps: str | None,
            out: Path | None, revision: str | None) -> None:
    """Per step and tensor, cosine similarity and relative l2 distance between two runs.

    Tensors are read from each run's archive one pair at a time (memory: one pair).

    Example: neox-export compare seeds --runs 410m-seed1,410m-seed2 --kind model
    """
    from exporter.catalog.compare import compare_runs
    from exporter.catalog.reader import open_catalog
    from exporter.pipeline.progress import byte_bar

    names = [r.strip() for r in runs.split(",")]
    if len(names) != 2 or not all(names):
        raise click.BadParameter("two run names, A,B", param_hint="--runs")
    opened = open_catalog(catalog_location, revision)
    with byte_bar(f"compare {names[0]} {names[1]}", disable=is_quiet()) as advance:
        result = compare_runs(opened, names[0], names[1], kind=kind, match=match,
                              steps=_step_list(steps), out=out, progress=advance)
    say(f"wrote {result.path}: {result.rows} tensor pairs over {len(result.steps)} step(s)")


@click.command()
@click.argument("archive", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--kind", "kinds", multiple=True, default=("model",), show_default=True,
              type=click.Choice(KINDS), help="Tensor kinds to cover (repeatable).")
@click.option("--match", default=None, help="Glob over tensor names (default: every tensor).")
@verbosity_options
def deltas(archive: Path, kinds: tuple[str, ...], match: str | None) -> None:
    """Step-to-step change of every tensor: l2 of the update and its ratio to the weight's l2.

    Writes index/deltas/step{N}.parquet into the archive, one shard per consecutive step
    pair, reading two steps at a time; shards already there are kept.

    Example: neox-export deltas archive --kind model --kind master
    """
    from exporter.catalog.deltas import compute_deltas
    from exporter.pipeline.progress import byte_bar

    with byte_bar(f"deltas {archive.name}", disable=is_quiet()) as advance:
        result = compute_deltas(archive, kinds=kinds, match=match, progress=advance)
    say(f"{archive}: {len(result.written)} step pair(s) written ({result.rows} rows), "
               f"{len(result.kept)} already there")
