"""The ``neox-export`` command: a thin shell over the library (:mod:`exporter.cli.main`)."""

from exporter.cli.main import cli, main, run

__all__ = ["cli", "main", "run"]
