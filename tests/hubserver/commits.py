"""Commits over HTTP: the preupload and commit endpoints.

Follows huggingface_hub 2.4 ``_commit_api.py``: ``_fetch_upload_modes`` asks
``POST /api/{type}s/{repo}/preupload/{revision}`` whether each file is "regular" or "lfs"
(and its current oid, to skip unchanged files); ``_send_commit`` posts NDJSON lines to
``POST /api/{type}s/{repo}/commit/{revision}``: a ``header`` (summary, description,
``parentCommit``), then ``file`` (base64 content), ``lfsFile`` (sha256 of an uploaded LFS
object), ``deletedFile`` and ``deletedFolder`` operations. A commit applies all of them or
none; a ``parentCommit`` that is no longer the branch head is refused with HTTP 412.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from .errors import BadRequest, Unprocessable
from .storage import AddFile, CommitOperation, DeleteFile, DeleteFolder, HubStore, Repo
from .wire import Request, Response, json_response


class CommitApi:
    """Answers preupload and commit requests for a repository."""

    def __init__(self, store: HubStore, repo_url: Callable[[Repo], str], author: str) -> None:
        self.store = store
        self._repo_url = repo_url
        self.author = author

    def preupload(self, request: Request, repo: Repo, revision: str) -> Response:
        """Upload mode and current oid (LFS: sha256; regular: git blob id) of each file."""
        request.require_token()
        body = request.json()
        head = self.store.resolve(repo, revision)
        files = []
        for item in body.get("files", []):
            sample = base64.b64decode(item.get("sample") or "")
            lfs = self.store.lfs_policy.is_lfs(item["path"], int(item["size"]), sample)
            existing = head.files.get(item["path"])
            remote_oid = None
            if existing is not None:
                remote_oid = existing.sha256 if existing.lfs else existing.oid
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": remote_oid,
                }
            )
        return json_response({"files": files, "commitOid": head.oid})

    def commit(self, request: Request, repo: Repo, branch: str) -> Response:
        """Apply one NDJSON commit to ``branch``; answer its id and URL."""
        request.require_token()
        if request.flag("create_pr"):
            request.body.drain()
            raise BadRequest("Pull requests are not supported by this server")
        header: dict[str, Any] = {}
        operations: list[CommitOperation] = []
        for line in request.body.read().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                operations.append(self._regular_file(value))
            elif key == "lfsFile":
                operations.append(self._lfs_file(value))
            elif key == "deletedFile":
                operations.append(DeleteFile(clean_path(value["path"])))
            elif key == "deletedFolder":
                operations.append(DeleteFolder(clean_path(value["path"])))
            else:
                raise BadRequest(f"Unknown commit operation {key!r}")
        if not header.get("summary"):
            raise BadRequest("The commit needs a header with a summary")
        commit = self.store.commit(
            repo,
            branch,
            operations,
            title=header["summary"],
            message=header.get("description") or "",
            parent_commit=header.get("parentCommit"),
            author=self.author,
        )
        return json_response(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "hookOutput": "",
            }
        )

    def _regular_file(self, value: dict[str, Any]) -> AddFile:
        content = value["content"]
        if value.get("encoding") == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except binascii.Error as error:
                raise BadRequest(f"Bad base64 content for {value['path']}") from error
        else:
            data = content.encode()
        return AddFile(clean_path(value["path"]), self.store.put_bytes(data), lfs=False)

    def _lfs_file(self, value: dict[str, Any]) -> AddFile:
        oid = value["oid"]
        if not self.store.has_object(oid):
            raise Unprocessable(f"LFS object {oid} for {value['path']} was never uploaded")
        if value.get("size") is not None and int(value["size"]) != self.store.object_size(oid):
            raise Unprocessable(f"LFS object {oid} does not have size {value['size']}")
        return AddFile(clean_path(value["path"]), oid, lfs=True)


def clean_path(path: str) -> str:
    """``path`` without outer slashes; refused when empty or holding `.`, `..` or `//`."""
    clean = path.strip("/")
    if not clean or any(part in ("", ".", "..") for part in clean.split("/")):
        raise BadRequest(f"Invalid path in repo: {path!r}")
    return clean
