"""Checkpoint sources: local folders and Hugging Face Hub repositories (``hf://org/name``)."""

from __future__ import annotations

from pathlib import Path

from exporter.sources.base import FetchedCheckpoint, Source, SourceFile
from exporter.sources.local import LocalSource

__all__ = ["FetchedCheckpoint", "LocalSource", "Source", "SourceFile", "open_source"]


def open_source(uri: str, **hub_options: object) -> Source:
    """A source from a local path or ``hf://ORG/NAME`` (a model repository, one branch per step)."""
    if uri.startswith("hf://"):
        from exporter.hub.source import HubSource

        return HubSource(uri, **hub_options)  # type: ignore[arg-type]
    return LocalSource(Path(uri))
