"""The test Hub server: lifecycle, seeding, inspection and fault injection.

Example::

    server = HubServer(tmp_path).start()
    for step in (0, 1000):
        server.seed_repo("EleutherAI/neox-ckpt-pythia-tiny", checkpoint_dirs[step],
                         branch=f"step{step}", message=f"Add step {step}")
    rule = server.inject(method="GET", path_regex=r"/resolve/step0/", status=503, times=1)
    ...  # run the client against server.endpoint
    assert rule.fired == 1
    assert server.commit_count("EleutherAI/neox-ckpt-pythia-tiny", branch="step0") == 2
    server.stop()
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal

from .faults import FaultPlan, FaultRule, RequestRecord
from .routes import ApiOptions, HubApi
from .snapshot import Commit, FileEntry
from .storage import (
    DEFAULT_LFS_PATTERNS,
    DEFAULT_LFS_SIZE_THRESHOLD,
    AddFile,
    HubStore,
    LfsPolicy,
)
from .throttle import Link
from .wire import HubHTTPServer

FileSource = Mapping[str, bytes | Path] | Path


class HubServer:
    """A Hugging Face Hub-compatible HTTP server on 127.0.0.1, backed by a folder.

    Args:
        root: folder for the object store (a fresh temporary folder when None).
        lfs_patterns: file name patterns stored with LFS (the Hub's default `.gitattributes`).
        lfs_size_threshold: files this large go to LFS whatever their name (Hub: 10 MiB).
        tree_page_size: entries per page of a tree listing (Hub: 1000; 50 when expanded).
        expanded_tree_page_size: entries per page of an expanded tree listing.
        commits_page_size: commits per page of the commit log.
        multipart_chunk_size: when set, LFS uploads larger than this use the multipart
            transfer with parts of this size; otherwise every upload is one PUT ("basic").
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
        lfs_size_threshold: int = DEFAULT_LFS_SIZE_THRESHOLD,
        tree_page_size: int = 1000,
        expanded_tree_page_size: int = 50,
        commits_page_size: int = 50,
        multipart_chunk_size: int | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="hubserver-") if root is None else None
        self.root = Path(self._tmp.name) if self._tmp is not None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = HubStore(self.root / "store", LfsPolicy(lfs_patterns, lfs_size_threshold))
        self.options = ApiOptions(
            tree_page_size=tree_page_size,
            expanded_tree_page_size=expanded_tree_page_size,
            commits_page_size=commits_page_size,
            multipart_chunk_size=multipart_chunk_size,
        )
        self.faults = FaultPlan()
        #: Bandwidth limits and the requests in progress (:mod:`.throttle`).
        self.link = Link()
        self._api = HubApi(self.store, lambda: self.endpoint, self.root / "uploads", self.options)
        self._httpd: HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Bind a free port and serve in a background thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._httpd = HubHTTPServer(self._api, self.faults, self.link)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections, and remove a temporary root."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.cut_connections()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._httpd = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:41234``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def internal_errors(self) -> list[str]:
        """Tracebacks of requests the server failed on (answered with HTTP 500)."""
        return list(self._httpd.internal_errors) if self._httpd is not None else []

    # -- seeding (no HTTP) ----------------------------------------------------------------

    def create_repo(self, repo_id: str, *, repo_type: str = "model", exist_ok: bool = True) -> None:
        """Create a repository (`main` holds the initial `.gitattributes` commit)."""
        if exist_ok and self.store.has_repo(repo_type, repo_id):
            return
        self.store.create_repo(repo_type, repo_id)

    def create_branch(
        self, repo_id: str, branch: str, *, repo_type: str = "model", revision: str = "main"
    ) -> str:
        """Create ``branch`` at ``revision``; returns the commit id it points at."""
        repo = self.store.get_repo(repo_type, repo_id)
        return self.store.create_branch(repo, branch, revision).oid

    def seed_repo(
        self,
        repo_id: str,
        files: FileSource,
        *,
        repo_type: str = "model",
        branch: str = "main",
        message: str = "Upload files",
        base: str = "main",
        path_prefix: str = "",
        lfs: bool | None = None,
    ) -> str:
        """Commit ``files`` to ``branch`` directly in the store; returns the new commit id.

        The repository is created if missing, and ``branch`` is created at ``base`` if missing.
        ``files`` maps paths in the repository to bytes or to local files; a folder stands
        for all the files below it, by relative path. ``path_prefix`` is prepended to every
        path. Whether a file is stored with LFS follows the server's rules (name pattern such
        as ``*.pt``, size, binary content) unless ``lfs`` forces it for all files.
        """
        self.create_repo(repo_id, repo_type=repo_type)
        repo = self.store.get_repo(repo_type, repo_id)
        if branch not in repo.branches:
            self.store.create_branch(repo, branch, base)
        operations = []
        for path, source in sorted(_expand_sources(files).items()):
            full_path = f"{path_prefix.strip('/')}/{path}" if path_prefix.strip("/") else path
            if isinstance(source, Path):
                sha256 = self.store.put_file(source)
            else:
                sha256 = self.store.put_bytes(source)
            size = self.store.object_size(sha256)
            with self.store.object_path(sha256).open("rb") as stream:
                sample = stream.read(512)
            is_lfs = self.store.lfs_policy.is_lfs(full_path, size, sample) if lfs is None else lfs
            operations.append(AddFile(full_path, sha256, is_lfs))
        return self.store.commit(repo, branch, operations, title=message, author="seed").oid

    # -- inspection -----------------------------------------------------------------------

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        return self.store.has_repo(repo_type, repo_id)

    def branches(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        """Branch name -> head commit id."""
        repo = self.store.get_repo(repo_type, repo_id)
        with self.store.lock:
            return dict(repo.branches)

    def head(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> str:
        """The commit id ``revision`` (branch, tag or commit id) points at."""
        repo = self.store.get_repo(repo_type, repo_id)
        return self.store.resolve(repo, revision).oid

    def commits(
        self, repo_id: str, *, repo_type: str = "model", branch: str = "main"
    ) -> list[Commit]:
        """The commits reachable from ``branch``, newest first (the initial commit last)."""
        repo = self.store.get_repo(repo_type, repo_id)
        return self.store.history(repo, self.store.resolve(repo, branch))

    def commit_count(self, repo_id: str, *, repo_type: str = "model", branch: str = "main") -> int:
        """How many commits ``branch`` holds, the repository's initial commit included."""
        return len(self.commits(repo_id, repo_type=repo_type, branch=branch))

    def list_files(
        self, repo_id: str, *, repo_type: str = "model", revision: str = "main"
    ) -> dict[str, FileEntry]:
        """Path -> file entry (size, sha256, git oid, LFS flag) at ``revision``."""
        repo = self.store.get_repo(repo_type, repo_id)
        return dict(self.store.resolve(repo, revision).files)

    def read_file(
        self, repo_id: str, path: str, *, repo_type: str = "model", revision: str = "main"
    ) -> bytes:
        """The content of ``path`` at ``revision``."""
        entry = self.list_files(repo_id, repo_type=repo_type, revision=revision)[path]
        return self.store.read_object(entry.sha256)

    # -- faults and request log -----------------------------------------------------------

    def inject(
        self,
        *,
        path_regex: str,
        status: int = 503,
        method: str | None = None,
        times: int | None = 1,
        headers: Mapping[str, str] | None = None,
    ) -> FaultRule:
        """Answer the next ``times`` matching requests with ``status`` (None: every time).

        ``path_regex`` is searched in the decoded URL path (no query string), e.g.
        ``r"/resolve/"``, ``r"/api/models/.*/tree/"``, ``r"\\.git/info/lfs/"``.
        """
        return self.faults.add(
            FaultRule(
                "status", path_regex, method, times, status=status, headers=dict(headers or {})
            )
        )

    def inject_drop(
        self,
        path_regex: str,
        *,
        after_bytes: int = 0,
        times: int | None = 1,
        method: str | None = None,
        phase: Literal["request", "response"] = "response",
        reset: bool = False,
    ) -> FaultRule:
        """Close the connection of the next ``times`` matching requests mid-transfer.

        With ``phase="response"`` the request is handled, then only the headers and
        ``after_bytes`` bytes of the body are sent; with ``phase="request"`` the server reads
        ``after_bytes`` bytes of the request body and hangs up without handling it.
        ``reset`` sends a TCP reset instead of a clean close.
        """
        action = "drop_response" if phase == "response" else "drop_request"
        return self.faults.add(
            FaultRule(action, path_regex, method, times, after_bytes=after_bytes, reset=reset)
        )

    def inject_lost_response(
        self,
        path_regex: str = r"^/api/[a-z]+s/.+/commit/",
        *,
        method: str | None = "POST",
        times: int | None = 1,
        reset: bool = False,
    ) -> FaultRule:
        """Handle the next ``times`` matching requests fully, then hang up without answering.

        By default it targets commits: the commit lands, the client gets no response.
        """
        return self.faults.add(FaultRule("lose_response", path_regex, method, times, reset=reset))

    def inject_short_range(
        self, path_regex: str = r"/resolve/", *, keep: int = 0, times: int | None = 1,
        method: str | None = "GET",
    ) -> FaultRule:
        """Answer the next ``times`` matching requests with only their first ``keep`` body bytes,
        in a well-formed response (``Content-Length`` and ``Content-Range`` agree with it)."""
        return self.faults.add(FaultRule("short_range", path_regex, method, times, after_bytes=keep))

    def inject_headers(
        self, path_regex: str, headers: Mapping[str, str], *, times: int | None = 1,
        method: str | None = "GET",
    ) -> FaultRule:
        """Handle the next ``times`` matching requests, sending ``headers`` in place of the
        response's own (``{"X-Repo-Commit": "0" * 40}`` claims another revision)."""
        return self.faults.add(
            FaultRule("rewrite_headers", path_regex, method, times, headers=dict(headers))
        )

    def clear_faults(self) -> None:
        self.faults.clear()

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received so far, in order."""
        return self.faults.records()

    def count_requests(self, method: str | None = None, path_regex: str = "") -> int:
        """How many requests matched ``method`` (any when None) and ``path_regex``."""
        pattern = re.compile(path_regex)
        return sum(
            1
            for record in self.requests
            if (method is None or record.method == method.upper()) and pattern.search(record.path)
        )

    def bytes_sent(self, method: str | None = None, path_regex: str = "") -> int:
        """Bytes of response body sent for the requests matching ``method`` and ``path_regex``
        (file downloads: ``path_regex=r"/resolve/"``)."""
        pattern = re.compile(path_regex)
        return sum(
            record.body_bytes
            for record in self.requests
            if (method is None or record.method == method.upper()) and pattern.search(record.path)
        )

    def clear_requests(self) -> None:
        self.faults.clear_records()


def _expand_sources(files: FileSource) -> dict[str, bytes | Path]:
    if isinstance(files, Path):
        if not files.is_dir():
            raise ValueError(f"{files} is not a folder; pass a mapping to seed single files")
        files = {"": files}
    expanded: dict[str, bytes | Path] = {}
    for path, source in files.items():
        if isinstance(source, Path) and source.is_dir():
            for child in sorted(source.rglob("*")):
                if child.is_file():
                    relative = child.relative_to(source).as_posix()
                    expanded[f"{path.strip('/')}/{relative}" if path.strip("/") else relative] = (
                        child
                    )
        else:
            expanded[path.strip("/")] = source
    return expanded
