"""``neox-export push`` and ``neox-export plot``: thin shells over publish and archive.plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from exporter.archive.plot import STATISTICS
from exporter.records import KINDS

if TYPE_CHECKING:
    from exporter.hub.publish import PushEvent

def echo_push_event(event: PushEvent) -> None:
    """Print one :class:`exporter.hub.publish.PushEvent` (retries on stderr)."""
    steps = ",".join(map(str, event.steps))
    commit = f" {event.commit[:12]}" if event.commit else ""
    text = f"{event.action:<7}{' steps ' + steps if steps else ''}{commit}  {event.detail}"
    click.echo(text.rstrip(), err=event.action == "retry")


@click.command()
@click.argument("archive", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing).")
@click.option("--private", is_flag=True, help="Create the dataset repository private.")
@click.option("--steps-per-commit", default=10, show_default=True, type=click.IntRange(1, 10_000),
              help="Whole steps per commit (the Hub allows about 128 commits per hour).")
@click.option("--license", "license_id", default="apache-2.0", show_default=True,
              help="License identifier for the dataset card.")
@click.option("--token", default=None,
              help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`).")
@click.option("--force", is_flag=True,
              help="Push even into a dataset built from another source or with other options.")
@click.option("--wait", is_flag=True, help="If another command is writing ARCHIVE, wait for it.")
@click.pass_context
def push(ctx: click.Context, archive: Path, repo_id: str, revision: str | None, private: bool,
         steps_per_commit: int, license_id: str, token: str | None, force: bool,
         wait: bool) -> None:
    """Publish an archive as the Hub dataset REPO_ID (ORG/NAME), whole steps per commit.

    Steps already on the Hub with the same sha256s are skipped, so an interrupted push
    resumes; the dataset card (README.md, with a plot) and manifest.json come last.

    Example: neox-export push archive my-org/pythia-410m-seed8-checkpoints
    """
    from exporter.hub.publish import push_archive

    quiet = bool(ctx.obj and ctx.obj.get("quiet"))
    result = push_archive(archive, repo_id, private=private, revision=revision,
                          steps_per_commit=steps_per_commit, token=token, license=license_id,
                          force=force, wait=wait, progress=None if quiet else echo_push_event)
    click.echo(f"{result.url}: {len(result.commits)} commit(s), "
               f"{len(result.pushed_steps)} step(s) pushed, "
               f"{len(result.skipped_steps)} already there")


@click.command()
@click.argument("archive")
@click.option("--stat", default="l2", show_default=True, type=click.Choice(STATISTICS),
              help="Index column to draw.")
@click.option("--match", default="layers.*.attention.dense.weight", show_default=True,
              help="Glob over tensor names (any dotted tail of the name may match).")
@click.option("--kind", default="model", show_default=True, type=click.Choice(KINDS),
              help="Which tensors: model weights, optimizer state, buffers, engine state.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file to write.")
@click.option("--revision", default=None, help="Hub archives: branch or commit.")
def plot(archive: str, stat: str, match: str, kind: str, out: Path, revision: str | None) -> None:
    """Plot a per-step tensor statistic of an archive (a folder or hf://datasets/ORG/NAME).

    One line per matching tensor, step on the x axis; only the index is read.

    Example: neox-export plot archive --stat l2 --match 'layers.*.attention.dense.weight' --out l2.png
    """
    from exporter.archive.loader import open_archive
    from exporter.archive.plot import plot_statistic

    index = open_archive(archive, revision=revision).index
    path = plot_statistic(index, stat=stat, match=match, kind=kind, out=out)
    click.echo(f"wrote {path}")
