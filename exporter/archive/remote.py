"""Reading a Hub archive: small files by download, tensors by HTTP range request.

A tensor of a Hub archive is read as the byte range its index row gives (absolute file
offsets, as the streaming writer placed it), and nothing else: a 4 MB tensor of a 1.6 GB
optimizer file costs 4 MB; no safetensors header has to be read first. How (DESIGN.md "Facts about huggingface_hub 2.4 offline", range reads):
``get_session().get(hf_hub_url(...), headers={**build_hf_headers(), "Range": ...},
follow_redirects=True)`` sends exactly the range asked for, through the resolve redirect, with
the client's endpoint, token and session; ``HfFileSystem`` over-reads, so it is not used.

- Revision: the branch is resolved to a commit once, when the archive is opened, and every
  request names that commit, so a long analysis reads one consistent revision. A response
  whose ``X-Repo-Commit`` names another commit is an :class:`~exporter.errors.IntegrityError`.
- Checks: a range must come back whole (status 206, ``Content-Range`` and length as asked), and
  every tensor's bytes must match its index digest (:func:`exporter.archive.digest.
  check_tensor_bytes`) before it is cached or returned; a failure names the tensor.
- Retries: huggingface_hub 2.4 does not retry a 503 or a connection reset on a file GET
  (``exporter/hub/calls.py``); every request here goes through :func:`exporter.hub.calls.retry`.
- Coalescing and concurrency: tensors of one file whose byte ranges touch (or lie within
  ``max_gap`` bytes) are fetched together, in requests of at most ``max_request_bytes`` (a
  large tensor is split, so it downloads in parallel and a retry repeats one piece); requests
  run on ``concurrency`` threads (httpx clients are thread-safe; hashing releases the GIL).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from exporter.archive.cache import TensorCache
from exporter.archive.digest import check_tensor_bytes, digest_key
from exporter.errors import ArchiveError, IntegrityError
from exporter.hub.calls import retry
from exporter.hub.publish import RetryPolicy

T = TypeVar("T")

HUB_PREFIX = "hf://"
REPO_TYPE = "dataset"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class HubLocation:
    """A dataset repository and the revision asked for (None: ``main``)."""

    repo_id: str
    revision: str | None = None


def parse_hub_location(text: str, revision: str | None = None) -> HubLocation:
    """``hf://datasets/ORG/NAME`` or ``hf://datasets/ORG/NAME@REVISION`` as a location.

    Raises:
        ArchiveError: not a dataset URI, or two different revisions asked for.

    Example:
        >>> parse_hub_location("hf://datasets/me/pythia-tiny@step8")
        HubLocation(repo_id='me/pythia-tiny', revision='step8')
    """
    rest = text.removeprefix(HUB_PREFIX)
    if not rest.startswith("datasets/"):
        raise ArchiveError(f"{text}: archives live in dataset repositories (hf://datasets/ORG/NAME)")
    repo_id, _, pinned = rest.removeprefix("datasets/").strip("/").partition("@")
    if not repo_id:
        raise ArchiveError(f"{text}: no repository named (hf://datasets/ORG/NAME)")
    if pinned and revision and pinned != revision:
        raise ArchiveError(f"{text}: revision {pinned!r} in the URI, {revision!r} asked for")
    return HubLocation(repo_id, pinned or revision)


@dataclass(frozen=True)
class _Span:
    """One tensor to read: its index row and absolute byte range in its file."""

    row: Mapping[str, Any]
    start: int
    end: int


class HubReader:
    """Files and tensor byte ranges of one dataset repository at one commit.

    Args:
        location: repository and revision (a branch is resolved to its commit here).
        cache: where checked tensor bytes are kept.
        retry_policy: backoff for transient Hub errors.
        concurrency: requests in flight at once.
        max_gap: tensors of one file at most this many bytes apart share a request.
        max_request_bytes: the largest single request.
        token: Hub token (``HF_TOKEN`` or the saved login when None).
    """

    def __init__(self, location: HubLocation, *, cache: TensorCache,
                 retry_policy: RetryPolicy | None = None, concurrency: int = 8,
                 max_gap: int = 0, max_request_bytes: int = 32 << 20,
                 token: str | None = None) -> None:
        if concurrency < 1:
            raise ArchiveError(f"concurrency must be at least 1, got {concurrency}")
        self.repo_id = location.repo_id
        self.requested = location.revision or "main"
        self.cache = cache
        self.retry_policy = retry_policy or RetryPolicy()
        self.concurrency = concurrency
        self.max_gap = max_gap
        self.max_request_bytes = max_request_bytes
        self.token = token
        self.label = f"hf://datasets/{self.repo_id}"
        self._sizes: dict[str, int] = {}
        self.commit = self.requested  # until resolved, just below
        self.commit = self._resolve()

    # -- Hub calls ------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        policy = self.retry_policy
        return retry(fn, what=f"{what} ({self.label}@{self.commit})",
                     attempts=policy.attempts, base_delay=policy.base_delay,
                     max_delay=policy.max_delay, error=ArchiveError)

    def _resolve(self) -> str:
        """The commit the asked revision points at (remembered for offline use)."""
        from huggingface_hub import HfApi, is_offline_mode
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        if _COMMIT.match(self.requested):
            return self.requested
        if is_offline_mode():
            commit = self.cache.recall_ref(self.repo_id, self.requested)
            if commit is None:
                raise ArchiveError(f"{self.label}: offline (HF_HUB_OFFLINE), and revision "
                                   f"{self.requested!r} was never resolved online here")
            return commit
        try:
            commit = str(self._call(f"resolve revision {self.requested!r}", lambda: HfApi(
                token=self.token).repo_info(self.repo_id, repo_type=REPO_TYPE,
                                            revision=self.requested).sha))
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise ArchiveError(f"{self.label}@{self.requested}: {exc}") from exc
        self.cache.remember_ref(self.repo_id, self.requested, commit)
        return commit

    def path(self, relative: str) -> Path:
        """A local copy of one file at the pinned commit (downloaded once into the HF cache)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return Path(self._call(f"download {relative}", lambda: hf_hub_download(
                self.repo_id, relative, repo_type=REPO_TYPE, revision=self.commit,
                token=self.token)))
        except LocalEntryNotFoundError as exc:
            raise ArchiveError(f"{self.label}@{self.commit[:12]}: {relative} is not in the local "
                               f"cache and the Hub cannot be reached ({exc})") from exc
        except EntryNotFoundError as exc:
            raise ArchiveError(f"{self.label}@{self.commit[:12]}: missing {relative}") from exc

    def paths(self, relatives: Sequence[str]) -> list[Path]:
        """:meth:`path` of each file, ``concurrency`` downloads at a time, in order."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.path, relatives))

    def read_range(self, relative: str, start: int, end: int, what: str = "") -> bytes:
        """Bytes ``start``..``end - 1`` of a file at the pinned commit (``what`` names them).

        Raises:
            IntegrityError: the range came back short, or from another commit.
            ArchiveError: any other failure (transient ones after the retry budget).
        """
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub.errors import OfflineModeIsEnabled
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        url = hf_hub_url(self.repo_id, relative, repo_type=REPO_TYPE, revision=self.commit)
        headers = {**build_hf_headers(token=self.token), "Range": f"bytes={start}-{end - 1}"}
        named = f"{relative} bytes {start}-{end - 1}" + (f" ({what})" if what else "")

        def get() -> Any:
            response = get_session().get(url, headers=headers, follow_redirects=True)
            hf_raise_for_status(response)
            return response

        try:
            response = self._call(f"read {named}", get)
        except OfflineModeIsEnabled as exc:
            raise ArchiveError(f"{self.label}: {named} is not in the local cache, and "
                               f"HF_HUB_OFFLINE is set") from exc
        except ArchiveError:
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure, named
            raise ArchiveError(f"{self.label}@{self.commit[:12]}: could not read {named}: "
                               f"{exc}") from exc
        for hop in [*response.history, response]:
            served = hop.headers.get("X-Repo-Commit")
            if served is not None and served != self.commit:
                raise IntegrityError(f"{self.label}: {named} was served from commit {served}, "
                                     f"not the pinned {self.commit}")
        data = response.content
        sent_range = response.headers.get("Content-Range")
        if response.status_code == 206:
            match = _CONTENT_RANGE.match(sent_range or "")
            if match is None or int(match[1]) != start:
                data = b""  # misplaced: nothing of it is usable
        elif response.status_code == 200:  # the server ignored Range: keep what was asked
            data = data[start:end]
        if len(data) != end - start:
            raise IntegrityError(f"{self.label}: {named}: {len(data)} usable bytes came back "
                                 f"(range {sent_range!r}), {end - start} were asked for")
        return data

    # -- tensors --------------------------------------------------------------------------

    def file_sizes(self, relatives: Iterable[str]) -> dict[str, int]:
        """The sizes of files at the pinned commit, as the Hub lists them (asked once a file)."""
        from huggingface_hub import HfApi, is_offline_mode

        wanted = sorted(set(relatives) - self._sizes.keys())
        if wanted and is_offline_mode():
            raise ArchiveError(f"{self.label}@{self.commit[:12]}: tensors of {', '.join(wanted)} "
                               f"are not in the local cache, and offline mode (HF_HUB_OFFLINE) "
                               f"is set")
        if wanted:
            items = self._call("list file sizes", lambda: HfApi(token=self.token).get_paths_info(
                self.repo_id, wanted, repo_type=REPO_TYPE, revision=self.commit))
            self._sizes.update({item.path: int(item.size) for item in items
                                if getattr(item, "size", None) is not None})
        return self._sizes

    def _span(self, row: Mapping[str, Any], sizes: Mapping[str, int]) -> _Span:
        # The index records absolute file offsets (exporter/convert/stream.py places each
        # tensor; exporter/verify.py seeks to them), so no header has to be read first; the
        # range must lie inside the file as the Hub lists it before a buffer is allocated.
        begin, end = int(row["data_offset_begin"]), int(row["data_offset_end"])
        size = sizes.get(row["file"])
        if size is None or not 0 <= begin <= end <= size:
            raise IntegrityError(
                f"{self.label}@{self.commit[:12]}: {row['kind']} tensor {row['name']!r} of step "
                f"{row['step']}: bytes [{begin}, {end}) of {row['file']} lie outside the file "
                f"({'not on the Hub' if size is None else f'{size} bytes'})")
        return _Span(row, begin, end)

    def _groups(self, spans: Iterable[_Span]) -> list[list[_Span]]:
        """Spans of one file whose ranges touch (within ``max_gap``) are read together."""
        groups: list[list[_Span]] = []
        for span in sorted(spans, key=lambda s: (s.row["file"], s.start)):
            last = groups[-1] if groups else None
            if (last is not None and last[-1].row["file"] == span.row["file"]
                    and span.start - max(s.end for s in last) <= self.max_gap):
                last.append(span)
            else:
                groups.append([span])
        return groups

    def _check(self, group: list[_Span], data: bytearray) -> dict[str, memoryview]:
        """Each tensor of a group read into ``data``, checked against its digest and cached;
        the tensors are views of ``data`` (no copy: a whole file's worth stays one buffer)."""
        start = group[0].start
        view = memoryview(data)
        found: dict[str, memoryview] = {}
        for span in group:
            piece = view[span.start - start:span.end - start]
            check_tensor_bytes(piece, span.row)
            key = digest_key(span.row)
            if key not in found:
                self.cache.put(key, piece)
                found[key] = piece
        return found

    def fetch(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, memoryview]:
        """The checked bytes of each row's tensor, by digest key, read by range and cached.

        Every row takes part in coalescing (leaving out rows with equal bytes would leave
        holes); each group's range is cut into requests of at most ``max_request_bytes``, all
        of them run on the thread pool, then each tensor is checked.
        """
        sizes = self.file_sizes(r["file"] for r in rows)
        groups = self._groups(self._span(r, sizes) for r in rows)
        buffers = [bytearray(max(s.end for s in g) - g[0].start) for g in groups]
        requests = []
        for group, buffer in zip(groups, buffers, strict=True):
            names = ", ".join(repr(s.row["name"]) for s in group[:3])
            what = (f"step {group[0].row['step']} {group[0].row['kind']} tensor(s) {names}"
                    f"{', ...' if len(group) > 3 else ''}")
            for offset in range(0, len(buffer), self.max_request_bytes):
                requests.append((group, buffer, offset,
                                 min(offset + self.max_request_bytes, len(buffer)), what))

        def read(request: tuple[list[_Span], bytearray, int, int, str]) -> None:
            group, buffer, begin, end, what = request
            first = group[0].start
            buffer[begin:end] = self.read_range(group[0].row["file"], first + begin,
                                                first + end, what=what)

        found: dict[str, memoryview] = {}
        with ThreadPoolExecutor(self.concurrency) as pool:
            list(pool.map(read, requests))
            for part in pool.map(self._check, groups, buffers):
                found.update(part)
        return found
