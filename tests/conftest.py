"""Shared fixtures. Hub server fixtures live in conftest_hub.py (loaded as a plugin)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test-only packages (hubserver, fixtures) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["tests.conftest_hub"]
