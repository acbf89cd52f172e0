"""Git LFS uploads: the batch API and the storage it points at.

The batch endpoint (``POST {repo}.git/info/lfs/objects/batch``) follows the git-lfs batch API
as huggingface_hub 2.4 calls it (``lfs.py``, ``post_lfs_batch_info`` and ``lfs_upload``):
objects already stored for the repository get no actions; the others get an ``upload``
action (one PUT, "basic"; or, for the "multipart" transfer, a ``chunk_size`` and one URL per
part in its ``header``, then a completion POST to the upload URL) and a ``verify`` action.

The storage lives on the same server under ``/__hubserver__/lfs/``: ``PUT {oid}`` (basic),
``PUT {oid}/part/{n}`` and ``POST {oid}`` (multipart), ``POST {oid}/verify``. It needs no
token, as signed storage URLs do not. Every upload is checked against its sha256.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import BadRequest, EntryNotFound, UnknownRoute
from .storage import HubStore, Readable, Repo
from .wire import Request, Response, json_response

INTERNAL_PREFIX = "__hubserver__"
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"


class LfsApi:
    """Answers LFS batch requests and receives the uploads they ask for."""

    def __init__(
        self,
        store: HubStore,
        endpoint: Callable[[], str],
        uploads: Path,
        multipart_chunk_size: Callable[[], int | None],
    ) -> None:
        self.store = store
        self._endpoint = endpoint
        self.uploads = uploads
        self._multipart_chunk_size = multipart_chunk_size

    def batch(self, request: Request, repo: Repo) -> Response:
        """The upload actions for each object of an upload batch."""
        request.require_token()
        body = request.json()
        if body.get("operation") != "upload":
            raise BadRequest("Only the upload operation is supported")
        transfers = body.get("transfers") or ["basic"]
        chunk = self._multipart_chunk_size()
        storage = f"{self._endpoint()}/{INTERNAL_PREFIX}/lfs"
        chosen = "basic"
        objects = []
        for item in body.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects or not self.store.has_object(oid):
                upload: dict[str, Any] = {"href": f"{storage}/{oid}"}
                if chunk is not None and "multipart" in transfers and size > chunk:
                    chosen = "multipart"
                    parts = -(-size // chunk)
                    upload["header"] = {
                        "chunk_size": str(chunk),
                        **{str(n): f"{storage}/{oid}/part/{n}" for n in range(1, parts + 1)},
                    }
                entry["actions"] = {"upload": upload, "verify": {"href": f"{storage}/{oid}/verify"}}
            objects.append(entry)
        return json_response(
            {"transfer": chosen, "objects": objects}, headers={"Content-Type": LFS_CONTENT_TYPE}
        )

    def storage(self, request: Request, segments: list[str]) -> Response:
        """The storage side: ``segments`` follow ``/__hubserver__/``."""
        match request.method, segments:
            case "PUT", ["lfs", oid]:
                self._store_checked(oid, request.body)
                return Response()
            case "PUT", ["lfs", oid, "part", number]:
                part_dir = self.uploads / oid
                part_dir.mkdir(parents=True, exist_ok=True)
                data = request.body.read()
                (part_dir / f"{int(number):06d}").write_bytes(data)
                return Response(headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
            case "POST", ["lfs", oid]:
                return self._complete_multipart(oid, request.json())
            case "POST", ["lfs", oid, "verify"]:
                size = int(request.json()["size"])
                if not self.store.has_object(oid) or self.store.object_size(oid) != size:
                    raise EntryNotFound(f"LFS object {oid} of size {size} is not stored")
                return json_response({"success": True})
        raise UnknownRoute(f"No route for {request.method} {request.path}")

    def _complete_multipart(self, oid: str, completion: dict[str, Any]) -> Response:
        part_dir = self.uploads / oid
        numbers = sorted(int(part["partNumber"]) for part in completion.get("parts", []))
        paths = [part_dir / f"{number:06d}" for number in numbers]
        missing = [number for number, path in zip(numbers, paths, strict=True) if not path.exists()]
        if not numbers or missing:
            raise BadRequest(f"Parts {missing or numbers} of {oid} were not uploaded")
        with _Concatenation(paths) as stream:
            self._store_checked(oid, stream)
        shutil.rmtree(part_dir, ignore_errors=True)
        return json_response({"success": True})

    def _store_checked(self, oid: str, stream: Readable) -> None:
        sha256, _ = self.store.put_stream(stream)
        if sha256 != oid:
            raise BadRequest(f"Uploaded content has sha256 {sha256}, expected {oid}")


class _Concatenation:
    """A readable stream over several files in turn (the parts of a multipart upload)."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = list(paths)
        self._current: BinaryIO | None = None

    def __enter__(self) -> _Concatenation:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._current is not None:
            self._current.close()

    def read(self, size: int = -1) -> bytes:
        while True:
            if self._current is None:
                if not self._paths:
                    return b""
                self._current = self._paths.pop(0).open("rb")
            data = self._current.read(size)
            if data:
                return data
            self._current.close()
            self._current = None
