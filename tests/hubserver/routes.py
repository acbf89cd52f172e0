"""The Hub HTTP API, as huggingface_hub 2.4 and datasets 5.x call it.

Routes and JSON fields follow what the client reads (huggingface_hub ``hf_api.py``:
``ModelInfo``/``DatasetInfo``, ``RepoFile``/``RepoFolder``, ``list_repo_refs``,
``list_repo_commits``, ``get_paths_info``, ``create_repo``, ``create_branch``;
``file_download.py``: ``get_hf_file_metadata``, ``http_get``; ``utils/_pagination.py``: the
``Link: <...>; rel="next"`` header). Xet is never advertised: no ``X-Xet-*`` header, no
``xetHash`` field, no ``xet-auth`` link, so the client falls back to LFS and plain HTTP.

Commits are answered by :mod:`commits`, LFS uploads by :mod:`lfs`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from .commits import CommitApi
from .errors import (
    BadRequest,
    EntryNotFound,
    HubError,
    RangeNotSatisfiable,
    RepoNotFound,
    UnknownRoute,
)
from .lfs import INTERNAL_PREFIX, LfsApi
from .snapshot import Commit, FileEntry, Folder, list_tree, lookup
from .storage import HubStore, Repo
from .wire import FileSlice, Request, Response, json_response

TYPE_BY_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_SUBROUTES = frozenset(
    {"revision", "refs", "tree", "paths-info", "commits", "commit", "preupload", "branch", "tag"}
)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
USER_NAME = "hubserver-user"


@dataclass
class ApiOptions:
    """Server behaviour the tests may tune, read on every request."""

    tree_page_size: int = 1000
    expanded_tree_page_size: int = 50
    commits_page_size: int = 50
    multipart_chunk_size: int | None = None


def error_response(error: HubError) -> Response:
    headers = {"X-Error-Message": error.message}
    if error.code is not None:
        headers["X-Error-Code"] = error.code
    headers.update(error.headers)
    return json_response({"error": error.message}, status=error.status, headers=headers)


class HubApi:
    """Turns requests into responses over a :class:`HubStore`."""

    def __init__(
        self, store: HubStore, endpoint: Callable[[], str], uploads: Path, options: ApiOptions
    ) -> None:
        self.store = store
        self._endpoint = endpoint
        self.options = options
        self.lfs = LfsApi(store, endpoint, uploads, lambda: options.multipart_chunk_size)
        self.commits = CommitApi(store, self._repo_url, USER_NAME)

    @property
    def endpoint(self) -> str:
        return self._endpoint()

    def __call__(self, request: Request) -> Response:
        try:
            return self._dispatch(request)
        except HubError as error:
            return error_response(error)

    def _dispatch(self, request: Request) -> Response:
        segments = request.segments
        if segments[:1] == ["api"]:
            return self._api(request, segments[1:])
        if segments[:1] == [INTERNAL_PREFIX]:
            return self.lfs.storage(request, segments[1:])
        if request.path.endswith(".git/info/lfs/objects/batch") and len(segments) > 4:
            repo_type, repo_id = _repo_from_url_segments(
                [*segments[:-5], segments[-5].removesuffix(".git")]
            )
            return self.lfs.batch(request, self.store.get_repo(repo_type, repo_id))
        if "resolve" in segments:
            return self._resolve(request, segments)
        raise UnknownRoute(f"No route for {request.method} {request.path}")

    # -- /api -----------------------------------------------------------------------------

    def _api(self, request: Request, segments: list[str]) -> Response:
        match request.method, segments:
            case "GET", ["whoami-v2"]:
                request.require_token()
                return json_response(
                    {
                        "type": "user",
                        "name": USER_NAME,
                        "fullname": "Hub Server User",
                        "orgs": [],
                        "auth": {"type": "access_token", "accessToken": {"role": "write"}},
                    }
                )
            case "POST", ["validate-yaml"]:
                request.body.drain()
                return json_response({"errors": [], "warnings": []})
            case "POST", ["repos", "create"]:
                return self._create_repo(request)
            case "DELETE", ["repos", "delete"]:
                request.require_token()
                body = request.json()
                repo_id = _join_repo_id(body.get("organization"), body["name"])
                self.store.delete_repo(body.get("type") or "model", repo_id)
                return json_response({})
            case _, [plural, *rest] if plural in TYPE_BY_PLURAL and rest:
                repo_id, tail = _split_repo_id(rest)
                return self._repo_api(
                    request, self.store.get_repo(TYPE_BY_PLURAL[plural], repo_id), tail
                )
        raise UnknownRoute(f"No route for {request.method} {request.path}")

    def _repo_api(self, request: Request, repo: Repo, tail: list[str]) -> Response:
        match request.method, tail:
            case "GET", []:
                return self._info(request, repo, self.store.resolve(repo, "main"))
            case "GET", ["revision", *revision] if revision:
                return self._info(request, repo, self.store.resolve(repo, "/".join(revision)))
            case "GET", ["refs"]:
                return self._refs(request, repo)
            case "GET", ["tree", revision, *path]:
                return self._tree(request, repo, revision, "/".join(path))
            case "POST", ["paths-info", *revision] if revision:
                return self._paths_info(request, repo, "/".join(revision))
            case "GET", ["commits", *revision] if revision:
                return self._commits(request, repo, "/".join(revision))
            case "POST", ["commit", *revision] if revision:
                return self.commits.commit(request, repo, "/".join(revision))
            case "POST", ["preupload", *revision] if revision:
                return self.commits.preupload(request, repo, "/".join(revision))
            case "POST", ["branch", *branch] if branch:
                request.require_token()
                start = request.json().get("startingPoint") or "main"
                self.store.create_branch(repo, "/".join(branch), start)
                return json_response({})
            case "DELETE", ["branch", *branch] if branch:
                request.require_token()
                self.store.delete_branch(repo, "/".join(branch))
                return json_response({})
            case "POST", ["tag", *revision] if revision:
                request.require_token()
                self.store.create_tag(repo, request.json()["tag"], "/".join(revision))
                return json_response({})
            case "DELETE", ["tag", *tag] if tag:
                request.require_token()
                self.store.delete_tag(repo, "/".join(tag))
                return json_response({})
        raise UnknownRoute(f"No route for {request.method} {request.path}")

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _create_repo(self, request: Request) -> Response:
        request.require_token()
        body = request.json()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise BadRequest(f"Unknown repo type {repo_type}")
        repo_id = _join_repo_id(body.get("organization") or USER_NAME, body["name"])
        url = f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        if self.store.has_repo(repo_type, repo_id):
            return json_response(
                {"error": f"You already created this {repo_type} repo", "url": url},
                status=409,
            )
        self.store.create_repo(repo_type, repo_id)
        return json_response({"url": url, "name": repo_id, "id": _mongo_id(repo_type, repo_id)})

    # -- read API -------------------------------------------------------------------------

    def _info(self, request: Request, repo: Repo, commit: Commit) -> Response:
        with_blobs = request.flag("blobs")
        siblings = []
        for entry in sorted(commit.files.values(), key=lambda item: item.path):
            sibling: dict[str, Any] = {"rfilename": entry.path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": entry.pointer_size,
                    }
            siblings.append(sibling)
        author, _, _ = repo.repo_id.rpartition("/")
        info: dict[str, Any] = {
            "_id": _mongo_id(repo.repo_type, repo.repo_id),
            "id": repo.repo_id,
            "author": author or None,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        }
        if repo.repo_type == "dataset":
            info.update(description="", citation="")
        expand = request.query.get("expand", []) + request.query.get("expand[]", [])
        if expand:
            info = {key: value for key, value in info.items() if key in {"_id", "id", *expand}}
        return json_response(info)

    def _refs(self, request: Request, repo: Repo) -> Response:
        def refs(names: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [
                {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}
                for name, oid in sorted(names.items())
            ]

        with self.store.lock:
            data: dict[str, Any] = {
                "branches": refs(repo.branches, "heads"),
                "tags": refs(repo.tags, "tags"),
                "converts": [],
            }
        if request.flag("include_prs"):
            data["pullRequests"] = []
        return json_response(data)

    def _path_json(
        self, repo: Repo, commit: Commit, item: FileEntry | Folder, expand: bool
    ) -> dict:
        if isinstance(item, FileEntry):
            data: dict[str, Any] = {
                "type": "file",
                "oid": item.oid,
                "size": item.size,
                "path": item.path,
            }
            if item.lfs:
                data["lfs"] = {
                    "oid": item.sha256,
                    "size": item.size,
                    "pointerSize": item.pointer_size,
                }
        else:
            data = {"type": "directory", "oid": item.oid, "size": 0, "path": item.path}
        if expand:
            last = self.store.last_commit(repo, commit, item.path)
            data["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
            if isinstance(item, FileEntry):
                data["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
        return data

    def _tree(self, request: Request, repo: Repo, revision: str, path: str) -> Response:
        commit = self.store.resolve(repo, revision)
        found = lookup(commit, path)
        if not isinstance(found, Folder):
            raise EntryNotFound(f"{path} does not exist (or is not a folder) at {revision}")
        expand = request.flag("expand")
        items = list_tree(commit, path, recursive=request.flag("recursive"))
        size = self.options.expanded_tree_page_size if expand else self.options.tree_page_size
        page, link = self._page(request, items, size)
        return json_response(
            [self._path_json(repo, commit, item, expand) for item in page], headers=link
        )

    def _page(self, request: Request, items: list, size: int) -> tuple[list, dict[str, str]]:
        """One page of ``items`` from the ``cursor`` on, and the `Link` to the next one."""
        start = int(request.param("cursor") or 0)
        page = items[start : start + size]
        if start + size >= len(items):
            return page, {}
        query = {key: values[-1] for key, values in request.query.items() if key != "cursor"}
        query["cursor"] = str(start + size)
        url = f"{self.endpoint}{request.raw_path}?{urlencode(query)}"
        return page, {"Link": f'<{url}>; rel="next"'}

    def _paths_info(self, request: Request, repo: Repo, revision: str) -> Response:
        raw = request.body.read()
        if "json" in (request.headers.get("Content-Type") or ""):
            body = json.loads(raw)
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = (form.get("expand") or ["false"])[-1].lower() in ("1", "true")
        commit = self.store.resolve(repo, revision)
        found = [item for path in paths if (item := lookup(commit, path)) is not None]
        return json_response([self._path_json(repo, commit, item, expand) for item in found])

    def _commits(self, request: Request, repo: Repo, revision: str) -> Response:
        history = self.store.history(repo, self.store.resolve(repo, revision))
        page, link = self._page(request, history, self.options.commits_page_size)
        return json_response(
            [
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": commit.author, "avatar": None}],
                    "date": commit.date,
                }
                for commit in page
            ],
            headers=link,
        )

    def _resolve(self, request: Request, segments: list[str]) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise UnknownRoute(f"No route for {request.method} {request.path}")
        index = segments.index("resolve")
        repo_type, repo_id = _repo_from_url_segments(segments[:index])
        if index + 2 >= len(segments):
            raise UnknownRoute(f"No file named in {request.path}")
        repo = self.store.get_repo(repo_type, repo_id)
        commit = self.store.resolve(repo, segments[index + 1])
        path = "/".join(segments[index + 2 :])
        entry = commit.files.get(path)
        if entry is None:
            raise EntryNotFound(f"Entry not found: {path}", headers={"X-Repo-Commit": commit.oid})
        return self._file_response(request, entry, commit.oid)

    def _file_response(self, request: Request, entry: FileEntry, commit_oid: str) -> Response:
        """The file (or the asked byte range) with the headers `hf_hub_download` checks."""
        name = quote(PurePosixPath(entry.path).name)
        headers = {
            "X-Repo-Commit": commit_oid,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{name}; filename=\"{name}\";",
            "ETag": f'"{entry.sha256 if entry.lfs else entry.oid}"',
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        start, end = 0, entry.size
        status = 200
        wanted = request.headers.get("Range")
        if wanted is not None and (match := _RANGE.match(wanted.replace(" ", ""))):
            first, last = match.groups()
            if first:
                start = int(first)
                end = min(int(last) + 1, entry.size) if last else entry.size
            elif last:
                start = max(entry.size - int(last), 0)
            if start >= entry.size or start >= end:
                raise RangeNotSatisfiable(
                    f"Range {wanted} not satisfiable",
                    headers={"Content-Range": f"bytes */{entry.size}"},
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        return Response(
            status=status,
            headers=headers,
            body=FileSlice(self.store.object_path(entry.sha256), start, end - start),
        )


def _join_repo_id(organization: str | None, name: str) -> str:
    return f"{organization}/{name}" if organization else name


def _split_repo_id(rest: list[str]) -> tuple[str, list[str]]:
    """Split ``namespace/name/tail...`` (or a single-segment id) into repo id and tail."""
    if len(rest) >= 2 and rest[1] not in _REPO_SUBROUTES:
        return f"{rest[0]}/{rest[1]}", rest[2:]
    return rest[0], rest[1:]


def _repo_from_url_segments(segments: list[str]) -> tuple[str, str]:
    """(repo type, repo id) from web URL segments: ``[datasets/]namespace/name``."""
    if segments and segments[0] in TYPE_BY_PLURAL and len(segments) > 1:
        return TYPE_BY_PLURAL[segments[0]], "/".join(segments[1:])
    if not segments:
        raise RepoNotFound("No repository in URL")
    return "model", "/".join(segments)


def _mongo_id(repo_type: str, repo_id: str) -> str:
    return hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24]
