"""The ``neox-export`` command: a thin shell over the library.

Each command parses its options, calls one library function and prints the result; every
:class:`~exporter.errors.ExporterError` becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from typing import Any, NoReturn

import click

from exporter import __version__
from exporter.cli.logs import verbosity_options
from exporter.errors import ExporterError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="neox-export")
@verbosity_options
def cli() -> None:
    """Turn raw GPT-NeoX / DeepSpeed checkpoints into pickle-free safetensors + Parquet.

    No command ever executes code from a pickle: .pt files are read by a restricted reader
    that turns tensors into byte ranges and unknown objects into inert records.

    -v / -q go before or after the command name. Errors are one line on stderr and exit
    code 1 (2 for a mistyped command line).
    """


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
    except click.UsageError as exc:
        click.echo(usage_line(exc), err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"neox-export: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except ExporterError as exc:
        click.echo(f"neox-export: error: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    except OSError as exc:
        # `[Errno 20] Not a directory: 'x'` reads better as `x: Not a directory`.
        text = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        click.echo(f"neox-export: error: {_one_line(text)}", err=True)
        sys.exit(1)


def run() -> NoReturn:
    """The installed ``neox-export``: :func:`main`, then the process ends without tearing
    down the interpreter.

    Tearing it down (every module of torch, pyarrow and the package, and every object still
    alive) takes about half a second, after the work is done and its output written: as
    long as the rest of ``neox-export --help``, a tenth of a one-step export. Here the exit
    does what a normal one must, in its order: where a thread other than daemons still runs,
    it is the normal exit (which waits for it), as it is on an interpreter without CPython's
    ``atexit._run_exitfuncs``; else it ignores Ctrl-C from then on, runs the ``atexit`` handlers
    (logging's flush, Ray's shutdown, ``weakref.finalize``), flushes stdout and stderr and
    ends the process (:func:`os._exit`) with the status the command gave. An exception other
    than ``SystemExit`` (a bug: :func:`main` turns every expected error into one line) exits
    normally with its traceback; a Ctrl-C that lands after the command returned exits 130,
    as one during it does.
    """
    try:
        code: object = main()  # Click returns a command's ctx.exit(n) status (not standalone)
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # Ctrl-C between the command's return and here
        click.echo("aborted", err=True)
        code = 130
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)  # CPython's, undocumented
    if run_exitfuncs is None or any(t is not threading.main_thread() and not t.daemon
                                    for t in threading.enumerate()):
        sys.exit(code)
    if threading.current_thread() is threading.main_thread():
        # Nothing is left to stop: a Ctrl-C now would only end the process by the signal.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, exit status 1, as the interpreter does
        print(code, file=sys.stderr)
        status = 1
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            # The interpreter's own exit reports an unwritable stdout with status 120.
            status = status or 120
    os._exit(status)


def _one_line(text: str) -> str:
    """One line, shown as text: messages quote archive content (tensor names, paths), whose
    control characters are written as escapes."""
    from exporter.archive.text import terminal_text

    return terminal_text("; ".join(line.strip() for line in text.strip().splitlines()
                                   if line.strip()))


def usage_line(exc: click.UsageError) -> str:
    """A mistyped command line as one line: the command, what is wrong, where help is."""
    command = exc.ctx.command_path if exc.ctx is not None else "neox-export"
    message = " ".join(exc.format_message().split())
    return f"{command}: error: {message} (see '{command} --help')"
