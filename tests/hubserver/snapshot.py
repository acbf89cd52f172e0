"""Snapshots: the files of one commit, and the folders and listings derived from them.

A file is either a regular git blob or an LFS file; the ids follow git and git-lfs so the
client's checks hold:

- a regular file's ``oid`` is the git blob id of its content
  (``sha1(b"blob <size>\\0" + content)``, huggingface_hub ``utils/sha.py``, ``git_hash``);
- an LFS file's ``oid`` is the git blob id of its pointer file (git-lfs spec v1), and its
  ``lfs.oid`` is the sha256 of the content.

Folders are not stored: they exist through the files below them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath


def now_iso() -> str:
    """The current UTC time in the Hub's format (``%Y-%m-%dT%H:%M:%S.%fZ``, milliseconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs (spec v1) pointer file that stands for a content in git."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot."""

    path: str
    size: int
    sha256: str
    oid: str
    lfs: bool

    @property
    def pointer_size(self) -> int:
        """Size of the LFS pointer file that git holds for this file."""
        return len(lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class Commit:
    """One commit: a full snapshot of the repository and its history link."""

    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: Mapping[str, FileEntry]


@dataclass(frozen=True)
class Folder:
    """A folder of a snapshot (folders exist only through the files below them)."""

    path: str
    oid: str


def fingerprint(commit: Commit, path: str) -> tuple[tuple[str, str], ...]:
    """(path, oid) of every file at or below ``path``: equal iff nothing there changed."""
    prefix = path.rstrip("/") + "/"
    return tuple(
        sorted(
            (name, entry.oid)
            for name, entry in commit.files.items()
            if name == path or name.startswith(prefix)
        )
    )


def folder_oid(commit: Commit, path: str) -> str:
    """A stable id for a folder: it changes whenever a file below it changes."""
    listing = "\n".join(f"{name} {oid}" for name, oid in fingerprint(commit, path))
    return hashlib.sha1(f"tree {path}\n{listing}".encode()).hexdigest()


def folders_of(commit: Commit) -> set[str]:
    """Every folder path that holds at least one file of ``commit``."""
    found: set[str] = set()
    for name in commit.files:
        found.update(str(parent) for parent in PurePosixPath(name).parents if str(parent) != ".")
    return found


def lookup(commit: Commit, path: str) -> FileEntry | Folder | None:
    """The file or folder at ``path`` in ``commit``; None when there is neither."""
    path = path.strip("/")
    if path in commit.files:
        return commit.files[path]
    if path == "" or path in folders_of(commit):
        return Folder(path=path, oid=folder_oid(commit, path))
    return None


def list_tree(commit: Commit, path: str, *, recursive: bool) -> list[FileEntry | Folder]:
    """The files and folders below ``path``: direct children, or all descendants."""
    path = path.strip("/")
    prefix = f"{path}/" if path else ""
    items: list[FileEntry | Folder] = []
    for folder in sorted(folders_of(commit)):
        if folder.startswith(prefix) and (recursive or "/" not in folder[len(prefix) :]):
            items.append(Folder(path=folder, oid=folder_oid(commit, folder)))
    for name in sorted(commit.files):
        if name.startswith(prefix) and (recursive or "/" not in name[len(prefix) :]):
            items.append(commit.files[name])
    return items
