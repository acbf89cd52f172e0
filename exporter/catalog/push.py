"""Publish a catalog as a Hub dataset: its tables, card and plots in one verified commit.

A catalog is small (no tensors), so every file goes in one commit through
:meth:`exporter.hub.publish.Publisher.commit_files`: the same retried, read-back, never
duplicated commit that archive pushes use; an unchanged catalog pushed again makes no commit.
The card is regenerated for the repository first, so its snippets name it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from exporter.catalog.card import write_catalog_card
from exporter.catalog.layout import is_catalog
from exporter.errors import CatalogError
from exporter.files import file_sha256, is_temporary
from exporter.hub.calls import RetryPolicy
from exporter.hub.files import LocalFile
from exporter.hub.publish import Publisher, PushEvent, PushResult


def catalog_files(root: Path) -> list[LocalFile]:
    """Every file of the catalog folder, with its sha256 (temporary files left out)."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not is_temporary(p))
    return [LocalFile(p.relative_to(root).as_posix(), p, file_sha256(p), p.stat().st_size)
            for p in paths]


def push_catalog(root: str | Path, repo_id: str, *, private: bool = False,
                 revision: str | None = None, token: str | None = None,
                 license: str | None = None, retry: RetryPolicy | None = None,
                 progress: Callable[[PushEvent], None] | None = None) -> PushResult:
    """Publish the catalog folder ``root`` as the Hub dataset ``repo_id`` (created if missing).

    Example:
        >>> push_catalog("catalog", "me/pythia-seeds")      # doctest: +SKIP
    """
    root = Path(root)
    if not is_catalog(root):
        raise CatalogError(f"{root}: not a catalog")
    publisher = Publisher(root, repo_id, private=private, revision=revision, token=token,
                          retry=retry, progress=progress)
    write_catalog_card(root, repo_id, license=license, redraw=False)
    commit = publisher.commit_files(catalog_files(root), "Update catalog")
    publisher.progress(PushEvent("card", commit=commit,
                                 detail="catalog committed" if commit else "already up to date"))
    return publisher.result
