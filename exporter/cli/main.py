"""The ``neox-export`` command: a thin shell over the library.

Each command parses its options, calls one library function and prints the result; every
:class:`~exporter.errors.ExporterError` becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from exporter import __version__
from exporter.errors import ExporterError

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


def _register() -> None:
    from exporter.cli.build import build
    from exporter.cli.catalog import catalog, compare, deltas
    from exporter.cli.convert import convert, inspect, sample, verify
    from exporter.cli.hub import plot, push

    for command in (inspect, convert, verify, build, push, plot, sample, catalog, compare, deltas):
        cli.add_command(command)


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
