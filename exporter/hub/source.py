"""Checkpoints in a Hugging Face Hub model repository, one branch per training step.

EleutherAI publishes its raw Pythia checkpoints this way (e.g.
``EleutherAI/neox-ckpt-pythia-410m-seed8``: branches ``step0`` ... ``step143000``, each a full
GPT-NeoX checkpoint of about 5.7 GB). :class:`HubSource` lists the branches with
``HfApi.list_repo_refs``, pins each to the commit its ref targets, lists that commit's files
with ``HfApi.list_repo_tree`` (sizes, git blob ids, and LFS sha256s), and downloads one step at
a time with ``hf_hub_download(..., revision=<commit>, local_dir=...)`` into
``<download_dir>/step{N}``. The client writes each file to a uniquely named ``.incomplete``
file under ``local_dir/.cache/huggingface/download`` and renames it into place when complete
(``file_download._download_to_tmp_and_move``), and the whole step folder is deleted when the
``fetch`` context exits, so disk use stays at about one checkpoint per concurrent fetch.

Every file is checked after download: LFS files against the sha256 the Hub lists, regular
files against their git blob sha1. A mismatch is downloaded once more (``force_download``);
a second mismatch fails the step with a :class:`SourceError` naming the file. The client does
not check content hashes itself.

Network calls go through :func:`exporter.hub.calls.retry`, because huggingface_hub 2.4 does not
retry a 503 on a file GET, a connection reset mid-download, or any failure of
``list_repo_refs``. Endpoint, token, offline mode and cache folders are the client's own
settings (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE``);
nothing here names a host.

The object is picklable and holds only plain values (the ``HfApi`` client is created on first
use in each process), so it can be sent to worker processes and Ray tasks.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from huggingface_hub import HfApi, RepoFile, constants, hf_hub_download

from exporter import __version__
from exporter.errors import SourceError
from exporter.files import file_digests
from exporter.hub.calls import RetryPolicy, hub_call
from exporter.hub.files import RemoteFile
from exporter.sources.base import FetchedCheckpoint, Source, SourceFile

log = logging.getLogger(__name__)

T = TypeVar("T")

# An optional @REVISION pins the source to one step branch (or the branch at that commit), as
# huggingface_hub's HfFileSystem spells a revision in hf:// paths.
_URI = re.compile(
    r"^hf://(?:(?P<plural>models|datasets)/)?(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^@/\s]+))?/?$"
)
_REPO_TYPES = {None: "model", "models": "model", "datasets": "dataset"}

# Repository plumbing, not checkpoint content: every Hub repository's branches inherit the
# `.gitattributes` of its initial commit.
_SKIPPED_FILES = frozenset({".gitattributes"})

# Where `hf_hub_download(local_dir=...)` keeps its download metadata and partial files
# (huggingface_hub `_local_folder.py`, `get_local_download_paths`).
_CLIENT_METADATA = PurePosixPath(".cache/huggingface")


@dataclass(frozen=True)
class HubBranch:
    """A step's branch and the commit it pointed at when the branches were listed."""

    name: str
    commit: str


class HubSource(Source):
    """Checkpoints on the Hub, one branch per step (``step{N}``, or ``global_step{N}``).

    Args:
        uri: ``hf://ORG/NAME`` (a model repository; ``hf://datasets/ORG/NAME`` for a dataset).
        download_dir: where a step's files are downloaded while it is fetched (a folder under
            the system's temporary folder when None).
        max_disk: refuse steps whose files take more bytes than this.
        revision_prefix: branch names are ``{prefix}{N}`` or ``global_{prefix}{N}``.
        token: Hub token; None lets huggingface_hub find one (``HF_TOKEN``, ``hf auth login``).
        retry: backoff for transient Hub errors.

    Example:
        >>> source = HubSource("hf://EleutherAI/neox-ckpt-pythia-410m-seed8", Path("downloads"))
        >>> source.repo_id, source.repo_type
        ('EleutherAI/neox-ckpt-pythia-410m-seed8', 'model')
    """

    def __init__(
        self,
        uri: str,
        download_dir: str | Path | None = None,
        max_disk: int | None = None,
        revision_prefix: str = "step",
        token: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        match = _URI.match(uri)
        if match is None:
            raise SourceError(
                f"{uri!r}: not a Hub repository URI (expected hf://ORG/NAME for every step "
                f"branch, or hf://ORG/NAME@BRANCH for one)"
            )
        if not revision_prefix:
            raise SourceError("revision_prefix must not be empty")
        if max_disk is not None and max_disk <= 0:
            raise SourceError(f"max_disk must be positive, got {max_disk}")
        self.uri = uri
        self.repo_id = match["repo"]
        self.repo_type = _REPO_TYPES[match["plural"]]
        self.pinned: str | None = match["revision"]
        self.download_dir = (
            Path(download_dir)
            if download_dir is not None
            else Path(tempfile.gettempdir()) / "neox-exporter" / self.repo_id.replace("/", "--")
        )
        self.max_disk = max_disk
        self.revision_prefix = revision_prefix
        self.token = token
        self.retry = retry or RetryPolicy(attempts=5, base_delay=0.5)
        self._branch_pattern = re.compile(rf"^(?:global_)?{re.escape(revision_prefix)}(\d+)$")
        self._branches: dict[int, HubBranch] | None = None
        self._files: dict[int, list[RemoteFile]] = {}
        self._api: HfApi | None = None

    def __repr__(self) -> str:
        return f"HubSource({self.uri!r}, download_dir={str(self.download_dir)!r})"

    def with_download_dir(self, download_dir: str | Path) -> HubSource:
        """The same source downloading into ``download_dir`` (a Ray worker's own scratch)."""
        copy = HubSource.__new__(HubSource)
        copy.__dict__.update(self.__getstate__())
        copy.download_dir = Path(download_dir)
        return copy

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_api"] = None  # a client (and its connection pool) is made per process
        return state

    # -- listing ----------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Every step with a branch, ascending (the branches are listed once, then cached)."""
        return sorted(self._list_branches())

    def branch(self, step: int) -> HubBranch:
        """The branch holding ``step`` and the commit it is pinned to."""
        branches = self._list_branches()
        if step not in branches:
            raise SourceError(f"{self.uri}: no branch for step {step}")
        return branches[step]

    def files(self, step: int) -> list[RemoteFile]:
        """The files of ``step``'s commit (without ``.gitattributes``), listed once, then cached."""
        if step not in self._files:
            branch = self.branch(step)
            entries = self._call(
                lambda: list(
                    self._hf().list_repo_tree(
                        self.repo_id,
                        recursive=True,
                        revision=branch.commit,
                        repo_type=self.repo_type,
                        token=self.token,
                    )
                ),
                what=f"list the files of branch {branch.name} of {self.uri}",
            )
            files = [
                RemoteFile.of_entry(entry)
                for entry in entries
                if isinstance(entry, RepoFile) and entry.path not in _SKIPPED_FILES
            ]
            # The order LocalSource lists a folder in, so both sources describe a step alike.
            self._files[step] = sorted(files, key=lambda f: PurePosixPath(f.path))
        return self._files[step]

    def step_bytes(self, step: int) -> int:
        """Total size of ``step``'s files, from the Hub's listing (nothing is downloaded)."""
        return sum(f.size for f in self.files(step))

    # -- fetching ---------------------------------------------------------------------------

    @contextmanager
    def fetch(self, step: int) -> Iterator[FetchedCheckpoint]:
        """Download ``step``'s files into ``<download_dir>/step{N}``, verified; deleted on exit.

        Raises:
            SourceError: no such step, the step is larger than ``max_disk``, the Hub cannot be
                reached after retries, or a file's content does not match the Hub's hash twice.
        """
        branch = self.branch(step)
        files = self.files(step)
        size = sum(f.size for f in files)
        if self.max_disk is not None and size > self.max_disk:
            raise SourceError(
                f"{self.uri}: step {step} (branch {branch.name}) holds {size:,} bytes in "
                f"{len(files)} files, more than max_disk={self.max_disk:,} bytes"
            )
        folder = self.download_dir / f"step{step}"
        # Whatever an interrupted earlier fetch of this step left is stale.
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            fetched = self._download_all(step, branch, files, folder)
            _remove_client_metadata(folder)
            yield FetchedCheckpoint(step, folder, branch.commit, fetched)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _download_all(self, step: int, branch: HubBranch, files: list[RemoteFile],
                      folder: Path) -> list[SourceFile]:
        """Download ``files`` one after the other, each checked while the next downloads.

        Hashing a file takes about as long as downloading it at 1 GB/s; done in a thread
        beside the downloads, it keeps the link busy. A file that fails its check is
        downloaded once more (``force_download``) and checked again.
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-check") as checker:
            checks = [checker.submit(_check, self._get(branch, remote, folder, False), remote)
                      for remote in files]
            fetched = []
            for remote, check in zip(files, checks, strict=True):
                sha256, problem = check.result()
                if problem is not None:
                    log.warning("%s step %d: %s; downloading it again", self.uri, step, problem)
                    sha256, problem = _check(self._get(branch, remote, folder, True), remote)
                if problem is not None:
                    raise SourceError(
                        f"{self.uri}: step {step} (branch {branch.name}, commit "
                        f"{branch.commit[:12]}): {problem}, again after a second download")
                fetched.append(SourceFile(remote.path, remote.size, sha256))
        return fetched

    def _get(self, branch: HubBranch, remote: RemoteFile, folder: Path, force: bool) -> Path:
        """Download one file of ``branch`` into ``folder`` (again when ``force``)."""
        return Path(
            self._call(
                lambda: hf_hub_download(
                    self.repo_id,
                    remote.path,
                    repo_type=self.repo_type,
                    revision=branch.commit,
                    local_dir=folder,
                    force_download=force,
                    token=self.token,
                    library_name="neox-exporter",
                    library_version=__version__,
                ),
                what=f"download {remote.path} of branch {branch.name} of {self.uri}",
            )
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _hf(self) -> HfApi:
        if self._api is None:
            self._api = HfApi(
                token=self.token, library_name="neox-exporter", library_version=__version__
            )
        return self._api

    def _list_branches(self) -> dict[int, HubBranch]:
        if self._branches is not None:
            return self._branches
        if constants.HF_HUB_OFFLINE:
            raise SourceError(
                f"{self.uri}: offline mode (HF_HUB_OFFLINE) is set, and it prevents listing the "
                f"repository's branches; unset it, or export from a local copy of the checkpoints"
            )
        refs = self._call(
            lambda: self._hf().list_repo_refs(
                self.repo_id, repo_type=self.repo_type, token=self.token
            ),
            what=f"list the branches of {self.uri}",
        )
        branches: dict[int, HubBranch] = {}
        for ref in refs.branches:
            match = self._branch_pattern.match(ref.name)
            if match is None:
                continue
            step = int(match[1])
            if step in branches:
                raise SourceError(
                    f"{self.uri}: step {step} has two branches ({branches[step].name}, {ref.name})"
                )
            branches[step] = HubBranch(ref.name, ref.target_commit)
        if self.pinned is not None:
            branches = _pin(branches, self.pinned, self.uri)
        if not branches:
            names = ", ".join(sorted(ref.name for ref in refs.branches)) or "none"
            raise SourceError(
                f"{self.uri}: no branches named {self.revision_prefix}N or "
                f"global_{self.revision_prefix}N (branches: {names})"
            )
        self._branches = branches
        return branches

    def _call(self, fn: Callable[[], T], *, what: str) -> T:
        """``fn`` with transient failures retried and the client's errors as SourceError."""
        return hub_call(fn, what=what, repo_id=self.repo_id, policy=self.retry, error=SourceError)


def _pin(branches: dict[int, HubBranch], revision: str, uri: str) -> dict[int, HubBranch]:
    """The one step of ``@revision``: a step branch by name, or the step branch at that commit."""
    for step, branch in branches.items():
        if revision == branch.name or (len(revision) >= 7 and branch.commit.startswith(revision)):
            return {step: branch}
    names = ", ".join(b.name for _, b in sorted(branches.items())[:5])
    raise SourceError(f"{uri}: {revision!r} is not a step branch or the commit of one "
                      f"(step branches: {names}{' ...' if len(branches) > 5 else ''})")


def _check(path: Path, remote: RemoteFile) -> tuple[str, str | None]:
    """The file's sha256, and what is wrong with it compared with the Hub's listing (or None).

    LFS files are compared by sha256 (the LFS object id); regular files by git blob sha1, the
    ``oid`` the Hub's tree API lists (``sha1("blob {size}\\0" + content)``, as ``git
    hash-object`` computes it).
    """
    size = path.stat().st_size
    digest, blob_id = file_digests(path, blob_id=remote.sha256 is None)
    if size != remote.size:
        return digest, f"{remote.path}: downloaded {size:,} bytes, the Hub lists {remote.size:,}"
    if remote.sha256 is not None and digest != remote.sha256:
        return digest, (
            f"{remote.path}: sha256 {digest} does not match the Hub's {remote.sha256}"
        )
    if remote.sha256 is None and blob_id != remote.blob_id:
        return digest, (
            f"{remote.path}: git blob id {blob_id} does not match the Hub's "
            f"{remote.blob_id}"
        )
    return digest, None


def _remove_client_metadata(folder: Path) -> None:
    """Drop the client's download metadata so the folder holds exactly the repository's files."""
    metadata = folder / _CLIENT_METADATA
    shutil.rmtree(metadata, ignore_errors=True)
    parent = metadata.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
