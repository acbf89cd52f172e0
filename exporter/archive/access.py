"""Where an archive's files come from: a local folder (files removed after a verified push
are fetched from the Hub at the recorded commit), or a Hub dataset at one commit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from exporter.archive.layout import (
    TENSOR_INDEX_DIR,
    checkpoint_index_file,
    tensor_index_file,
)
from exporter.archive.push_state import pushed_file
from exporter.archive.remote import HubReader
from exporter.archive.trust import check_relative, inside_hub_cache, resolve_inside
from exporter.errors import ArchiveError


class LocalFiles:
    """Files of an archive folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, relative: str) -> Path:
        path = resolve_inside(self.root, relative, str(self.root))
        if path.exists():
            return path
        pushed = pushed_file(self.root, relative)
        if pushed is None:
            raise ArchiveError(f"{self.root}: missing {relative}")
        # Removed after a verified push: read at the commit the push record names.
        return _download(pushed.repo_id, relative, pushed.commit or pushed.revision,
                         pushed.repo_type)

    def index_paths(self, folder: str, steps: Sequence[int]) -> list[Path]:
        """The shards of the manifest's steps in an index folder, in step order, each resolved
        inside the archive (a shard, or the folder, that links out is refused)."""
        shard = tensor_index_file if folder == TENSOR_INDEX_DIR else checkpoint_index_file
        paths = [resolve_inside(self.root, shard(step), str(self.root)) for step in steps]
        return [path for path in paths if path.is_file()]


def _download(repo_id: str, relative: str, revision: str | None,
              repo_type: str = "dataset") -> Path:
    """One whole file of a Hub repository, through the Hugging Face cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, relative, repo_type=repo_type, revision=revision))
    except EntryNotFoundError as exc:
        raise ArchiveError(f"hf://datasets/{repo_id}: missing {relative}") from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ArchiveError(f"hf://datasets/{repo_id}: {exc}") from exc


class HubFiles:
    """Files of a Hub archive at one commit: downloaded whole when asked for, into the
    Hugging Face cache; the index shards are those of the manifest's steps."""

    def __init__(self, reader: HubReader) -> None:
        self.reader = reader
        self.root = None

    def path(self, relative: str) -> Path:
        from huggingface_hub.file_download import repo_folder_name

        label = f"hf://datasets/{self.reader.repo_id}"
        check_relative(relative, label)
        return inside_hub_cache(self.reader.path(relative), relative,
                                repo_folder_name(repo_id=self.reader.repo_id, repo_type="dataset"),
                                label)

    def index_paths(self, folder: str, steps: Sequence[int]) -> list[Path]:
        shard = tensor_index_file if folder == TENSOR_INDEX_DIR else checkpoint_index_file
        return self.reader.paths([shard(step) for step in steps])
