"""``python -m exporter``: the ``neox-export`` command."""

import sys

from exporter.cli import main

sys.exit(main())
