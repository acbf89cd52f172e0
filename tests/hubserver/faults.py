"""Fault injection and request logging for the test Hub server.

A :class:`FaultRule` matches requests by method and a regular expression searched in the
decoded URL path (no query string), and fires a limited number of times. What it does:

- ``status``: answer at once with an HTTP error status, without touching any state;
- ``drop_request``: read ``after_bytes`` of the request body, then close the connection;
- ``drop_response``: handle the request, send the headers and ``after_bytes`` of the body,
  then close the connection;
- ``lose_response``: handle the request completely (a commit lands), then close the
  connection without sending a single byte of the response;
- ``short_range``: handle the request, then send only the first ``after_bytes`` bytes of the
  body with headers that agree (``Content-Length``, and ``Content-Range`` for a 206): a
  well-formed response that holds less than was asked;
- ``rewrite_headers``: handle the request and send the response with ``headers`` replacing
  its own (e.g. another ``X-Repo-Commit``).

A close is a plain FIN, or a TCP reset (RST) when ``reset`` is set: the client sees the first
as an incomplete message (httpx ``RemoteProtocolError``) and the second as a connection reset
(httpx ``ReadError``), and huggingface_hub retries them differently
(``file_download.http_get`` resumes only after the former).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Literal

FaultAction = Literal[
    "status", "drop_request", "drop_response", "lose_response", "short_range", "rewrite_headers"
]


@dataclass
class FaultRule:
    """One injected fault; ``fired`` counts how many requests it has hit so far."""

    action: FaultAction
    path_regex: str
    method: str | None = None
    times: int | None = 1
    status: int = 503
    after_bytes: int = 0
    reset: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    fired: int = 0

    def __post_init__(self) -> None:
        self._pattern = re.compile(self.path_regex)
        if self.method is not None:
            self.method = self.method.upper()
        if self.times is not None and self.times < 1:
            raise ValueError(f"times must be at least 1 (or None for always), got {self.times}")
        if self.after_bytes < 0:
            raise ValueError(f"after_bytes must not be negative, got {self.after_bytes}")

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times

    def matches(self, method: str, path: str) -> bool:
        return (
            not self.exhausted
            and (self.method is None or self.method == method)
            and self._pattern.search(path) is not None
        )


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it.

    ``headers`` has lower-case names; ``status`` is None when no response was due;
    ``body_bytes`` counts the bytes of response body the server wrote to the socket.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int | None
    fault: FaultAction | None
    body_bytes: int = 0


class FaultPlan:
    """The active fault rules and the request log, shared by all handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._records: list[RequestRecord] = []

    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def take(self, method: str, path: str) -> FaultRule | None:
        """The first live rule matching this request, counted as fired; None if none."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path):
                    rule.fired += 1
                    return rule
            return None

    def record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def clear_records(self) -> None:
        with self._lock:
            self._records.clear()
