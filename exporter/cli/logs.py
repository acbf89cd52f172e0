"""How much the command says: ``-v``/``-vv``/``-q`` (before or after the subcommand), log lines
on stderr, and progress bars only on a terminal.

Levels: the default shows warnings and errors; ``-v`` adds progress lines (INFO); ``-vv`` adds
debug lines, huggingface_hub's included (its logger keeps its own level, WARNING, unless told:
``huggingface_hub.utils.logging.set_verbosity_debug``). ``-q`` keeps warnings and errors and
drops progress bars and the closing summaries of commands that write files.

Progress bars: ours are tqdm bars with ``disable=None`` (silent when stderr is not a terminal);
huggingface_hub's draw whenever they are not disabled
(``huggingface_hub/utils/tqdm.py``, ``are_progress_bars_disabled``), so they are switched off
under ``-q`` and when stderr is not a terminal, unless the user set
``HF_HUB_DISABLE_PROGRESS_BARS=0`` (which huggingface_hub gives priority too).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_handler: logging.Handler | None = None
_hub_level: int | None = None


def setup_logging(verbose: int, quiet: bool) -> None:
    """Route log records to stderr at the level ``-v``/``-q`` ask for (see module docstring)."""
    global _handler
    level = logging.WARNING if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    root = logging.getLogger()
    if _handler is None:
        _handler = _StderrHandler()
        _handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(_handler)
    root.setLevel(level)
    _hub_debug(verbose >= 2 and not quiet)
    if quiet or not _stderr_is_terminal():
        _disable_hub_progress_bars()


def _hub_debug(on: bool) -> None:
    """huggingface_hub's own logger at DEBUG for -vv; otherwise at the level it had (its
    default, or HF_HUB_VERBOSITY), restored if an earlier -vv in this process raised it."""
    global _hub_level
    from huggingface_hub.utils import logging as hub_logging

    if on:
        if _hub_level is None:
            _hub_level = hub_logging.get_verbosity()
        hub_logging.set_verbosity(logging.DEBUG)
    elif _hub_level is not None:
        hub_logging.set_verbosity(_hub_level)
        _hub_level = None


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _disable_hub_progress_bars() -> None:
    import importlib

    from huggingface_hub.utils import disable_progress_bars

    # The flag as `huggingface_hub.utils.tqdm` read it at import (the attribute `tqdm` of
    # huggingface_hub.utils is the class, hence the module lookup).
    if importlib.import_module("huggingface_hub.utils.tqdm").HF_HUB_DISABLE_PROGRESS_BARS is False:
        return  # HF_HUB_DISABLE_PROGRESS_BARS=0: the user asked for bars; huggingface_hub agrees
    disable_progress_bars()


def _settings(ctx: click.Context) -> dict[str, Any]:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {"verbose": 0, "quiet": False}
    return root.obj  # type: ignore[no-any-return]


def _on_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    settings = _settings(ctx)
    settings["verbose"] = settings.get("verbose", 0) + (value or 0)
    setup_logging(settings["verbose"], settings.get("quiet", False))


def _on_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    settings = _settings(ctx)
    settings["quiet"] = bool(settings.get("quiet")) or bool(value)
    setup_logging(settings.get("verbose", 0), settings["quiet"])


def verbosity_options(fn: F) -> F:
    """``-v``/``--verbose`` and ``-q``/``--quiet`` on a command (the group and every subcommand
    take them, so ``neox-export -q build`` and ``neox-export build -q`` mean the same)."""
    fn = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_on_quiet,
                      help="No progress bars and no closing summary; warnings and errors still "
                           "show.")(fn)
    fn = click.option("-v", "--verbose", count=True, expose_value=False, callback=_on_verbose,
                      help="More log output: -v progress lines, -vv debug lines (Hub requests "
                           "included).")(fn)
    return fn


def is_quiet() -> bool:
    """Whether ``-q`` was given anywhere on the command line."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and _settings(ctx).get("quiet"))


def say(text: str) -> None:
    """Print a closing summary line on stdout, unless ``-q``."""
    if not is_quiet():
        click.echo(text)
