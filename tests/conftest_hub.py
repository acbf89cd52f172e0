"""pytest plugin: a local Hugging Face Hub-compatible server with the real clients aimed at it.

The ``hub_server`` fixture starts a :class:`hubserver.HubServer` on 127.0.0.1 and, for the
duration of the test, points huggingface_hub and datasets at it (``HF_ENDPOINT`` and the
already-imported constants), with caches under the test's temporary folder, a dummy
``HF_TOKEN``, Xet disabled and telemetry off. Child processes inherit that environment.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hubserver import HubServer, patch_client


@pytest.fixture
def hub_server(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[HubServer]:
    """A started :class:`hubserver.HubServer`; stopped after the test."""
    root = tmp_path_factory.mktemp("hub")
    server = HubServer(root / "server").start()
    try:
        patch_client(monkeypatch, server.endpoint, root / "client")
        yield server
    finally:
        server.stop()
