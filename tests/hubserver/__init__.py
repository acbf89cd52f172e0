"""A Hugging Face Hub-compatible HTTP server for tests, driven through the real clients.

Start one with :class:`HubServer` (or the ``hub_server`` pytest fixture of
``tests/conftest_hub.py``), seed repositories without HTTP, inject faults, and point
huggingface_hub / datasets at it with :func:`patch_client` or :func:`client_env`.
"""

from .client import TEST_TOKEN, client_env, patch_client
from .faults import FaultRule, RequestRecord
from .server import HubServer
from .snapshot import Commit, FileEntry
from .throttle import Link, Transfer

__all__ = [
    "TEST_TOKEN",
    "Commit",
    "FaultRule",
    "FileEntry",
    "HubServer",
    "Link",
    "RequestRecord",
    "Transfer",
    "client_env",
    "patch_client",
]
