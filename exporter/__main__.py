"""``python -m exporter``: the ``neox-export`` command."""

from exporter.cli import run

run()
