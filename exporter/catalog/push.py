"""Publish a catalog as a Hub dataset: its tables, card and plots in one verified commit.

A catalog is small (no tensors), so every file goes in one commit through
:meth:`exporter.hub.publish.Publisher.commit_files`: the same retried, read-back, never
duplicated commit that archive pushes use; an unchanged catalog pushed again makes no commit.
The card is regenerated for the repository first, so its snippets name it. Index files the
remote holds and the catalog no longer does (a renamed run's shards) are then deleted, so the
card's ``configs`` globs read no stale rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from exporter.catalog.card import write_catalog_card
from exporter.catalog.layout import INDEX_DIR, is_catalog
from exporter.errors import CatalogError, PublishError
from exporter.files import file_sha256, is_temporary
from exporter.hub.calls import RetryPolicy, hub_call
from exporter.hub.files import LocalFile
from exporter.hub.publish import REPO_TYPE, Publisher, PushEvent, PushResult


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
    files = catalog_files(root)
    commit = publisher.commit_files(files, "Update catalog")
    publisher.progress(PushEvent("card", commit=commit,
                                 detail="catalog committed" if commit else "already up to date"))
    removed = _delete_stale(publisher, {f.path for f in files})
    if removed is not None:
        publisher.result.commits.append(removed)
        publisher.progress(PushEvent("delete", commit=removed, detail="stale index files removed"))
    return publisher.result


def _delete_stale(publisher: Publisher, keep: set[str]) -> str | None:
    """Delete the remote's index files that are not in ``keep``; the commit id, or None.

    Each attempt lists the branch head first and names it as parent, so a retry after a lost
    response finds nothing left to delete instead of failing or deleting twice.
    """
    from huggingface_hub import CommitOperationDelete

    api, repo_id, revision = publisher.api, publisher.repo_id, publisher.revision

    def attempt() -> str | None:
        head = str(api.repo_info(repo_id, repo_type=REPO_TYPE, revision=revision).sha)
        stale = sorted(p for p in api.list_repo_files(repo_id, repo_type=REPO_TYPE, revision=head)
                       if p.startswith(f"{INDEX_DIR}/") and p not in keep)
        if not stale:
            return None
        info = api.create_commit(repo_id, [CommitOperationDelete(path_in_repo=p) for p in stale],
                                 repo_type=REPO_TYPE, revision=revision, parent_commit=head,
                                 commit_message=f"Remove {len(stale)} stale index file(s)")
        return str(info.oid)

    return hub_call(attempt, what=f"remove stale index files ({repo_id})", repo_id=repo_id,
                    policy=publisher.retry, error=PublishError)
