"""Shared fixtures. The Hub test server's fixtures live in conftest_hub.py (a plugin).

Dependencies: `make test` installs the package with its `test` and `ray` extras, so every test
imports what it needs plainly (transformers, deepspeed, ray, yaml) and fails if it is missing;
no test is skipped for a missing package. Only the CUDA tests are skipped, on machines with no
CUDA device.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["conftest_hub"]
