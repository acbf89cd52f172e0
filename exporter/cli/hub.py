"""``neox-export push`` and ``neox-export plot``: thin shells over publish and archive.plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from exporter.catalog import GROUP_BY
from exporter.cli.logs import is_quiet, say, verbosity_options
from exporter.cli.options import check_token
from exporter.errors import OptionsError
from exporter.records import KINDS, STATISTICS

if TYPE_CHECKING:
    from exporter.hub.publish import PushEvent

def echo_push_event(event: PushEvent) -> None:
    """Print one :class:`exporter.hub.publish.PushEvent` (retries on stderr)."""
    steps = ",".join(map(str, event.steps))
    commit = f" {event.commit[:12]}" if event.commit else ""
    text = f"{event.action:<7}{' steps ' + steps if steps else ''}{commit}  {event.detail}"
    click.echo(text.rstrip(), err=event.action == "retry")


def license_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--license``: one of the Hub's identifiers, or None for the source's."""
    from exporter.hub.licenses import check_license

    if value is None:
        return None
    try:
        return check_license(value)
    except OptionsError as exc:
        raise click.BadParameter(str(exc)) from None


LICENSE_HELP = ("License of the dataset card: one of the Hub's identifiers (apache-2.0, mit, "
                "cc-by-4.0 ... or other). Default: the license in the source model's card, "
                "else 'unknown'.")


@click.command()
@click.argument("archive", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing).")
@click.option("--private", is_flag=True, help="Create the dataset repository private.")
@click.option("--steps-per-commit", default=10, show_default=True, type=click.IntRange(1, 10_000),
              help="Whole steps per commit (the Hub allows about 128 commits per hour).")
@click.option("--license", "license_id", default=None, callback=license_option, help=LICENSE_HELP)
@click.option("--token", default=None, callback=check_token,
              help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`).")
@click.option("--model-repo", default=None, metavar="ORG/NAME",
              help="Also publish each step as branch stepN of this model repository (Pythia's "
                   "layout), linked from the dataset card.")
@click.option("--tokenizer", default=None, metavar="PATH|hf://ORG/NAME",
              help="With --model-repo: tokenizer files to add to every branch.")
@click.option("--force", is_flag=True,
              help="Push even into a dataset built from another source or with other options.")
@click.option("--wait", is_flag=True, help="If another command is writing ARCHIVE, wait for it.")
@verbosity_options
def push(archive: Path, repo_id: str, revision: str | None, private: bool,
         steps_per_commit: int, license_id: str | None, token: str | None,
         model_repo: str | None, tokenizer: str | None, force: bool, wait: bool) -> None:
    """Publish an archive as the Hub dataset REPO_ID (ORG/NAME), whole steps per commit.

    Steps already on the Hub with the same sha256s are skipped, so an interrupted push
    resumes; the dataset card (README.md, with a plot) and manifest.json come last.

    Example: neox-export push archive my-org/pythia-410m-seed8-checkpoints
    """
    from exporter.hub.calls import require_token
    from exporter.hub.push import push_archive

    if tokenizer and not model_repo:
        raise click.BadParameter("needs --model-repo", param_hint="--tokenizer")
    token = require_token(token)
    result = push_archive(archive, repo_id, private=private, revision=revision,
                          steps_per_commit=steps_per_commit, token=token,
                          license=license_id, model_repo=model_repo, force=force, wait=wait,
                          progress=None if is_quiet() else echo_push_event)
    say(f"{result.url}: {len(result.commits)} commit(s), "
        f"{len(result.pushed_steps)} step(s) pushed, "
        f"{len(result.skipped_steps)} already there")
    if model_repo:
        push_model_to(archive, model_repo, dataset_repo=repo_id, tokenizer=tokenizer,
                      private=private, token=token, quiet=is_quiet())


def push_model_to(archive: Path, model_repo: str, *, dataset_repo: str | None,
                  tokenizer: str | None, private: bool = False, token: str | None = None,
                  quiet: bool = False) -> None:
    """Publish the archive's steps as branches of ``model_repo`` and report it."""
    from exporter.hub.modelrepo import push_model_repo

    result = push_model_repo(archive, model_repo, tokenizer=tokenizer, dataset_repo=dataset_repo,
                             private=private, token=token,
                             progress=None if quiet else echo_push_event)
    say(f"model repo {result.url}: {len(result.commits)} commit(s), "
        f"{len(result.branches)} branch(es)")


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
@click.option("--revision", default=None,
              help="Hub archives: branch or commit (or write hf://datasets/ORG/NAME@REVISION).")
@click.option("--logx/--no-logx", default=None,
              help="Logarithmic step axis (step 0 drawn on a linear stretch). "
                   "Default: on when the steps span two decades or more (Pythia's 0, 1, 2, 4 ... 143000).")
@click.option("--group-by", default="seed", show_default=True,
              type=click.Choice(GROUP_BY),
              help="Catalogs: label one line per run by this column.")
@click.option("--band", is_flag=True,
              help="Catalogs: the mean and min-max band across the --group-by values per step.")
@verbosity_options
def plot(archive: str, stat: str, match: str, kind: str, out: Path, revision: str | None,
         logx: bool | None, group_by: str, band: bool) -> None:
    """Plot a per-step tensor statistic of an archive (a folder or hf://datasets/ORG/NAME).

    One line per matching tensor, step on the x axis; only the index is read. For a catalog
    (neox-export catalog): one line per run (the mean over matching tensors), or with --band
    the mean and min-max across seeds, on a log-step axis.

    Example: neox-export plot archive --stat l2 --match 'layers.*.attention.dense.weight' --out l2.png
    """
    from exporter.archive.loader import open_archive
    from exporter.archive.plot import plot_statistic
    from exporter.catalog.reader import is_catalog_location

    if is_catalog_location(archive, revision):
        from exporter.catalog.plot import plot_runs
        from exporter.catalog.reader import open_catalog

        path = plot_runs(open_catalog(archive, revision), stat=stat, match=match, kind=kind,
                         group_by=group_by, band=band, out=out)
        say(f"wrote {path}")
        return
    index = open_archive(archive, revision=revision).index
    path = plot_statistic(index, stat=stat, match=match, kind=kind, out=out, logx=logx)
    say(f"wrote {path}")
