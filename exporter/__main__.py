"""``python -m exporter``: the ``neox-export`` command."""

from exporter.launcher import run

run()
