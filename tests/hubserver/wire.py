"""HTTP/1.1 plumbing of the test Hub server: requests, responses, keep-alive, faults.

Built on :mod:`http.server`. Bodies are read by Content-Length or chunked transfer coding
(httpx streams file uploads chunked when it cannot tell their length), always completely
before a response goes out so a kept-alive connection stays in step.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import Unauthorized
from .faults import FaultPlan, FaultRule, RequestRecord
from .throttle import Link

_CHUNK = 256 * 1024


class RequestBody:
    """The body of one request, readable once, by Content-Length or chunked coding."""

    def __init__(self, stream: BinaryIO, headers: Message,
                 on_read: Callable[[int], None] | None = None) -> None:
        self._stream = stream
        self._on_read = on_read
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._left = 0 if self._chunked else int(headers.get("Content-Length") or 0)
        self._done = not self._chunked and self._left == 0

    def _next_chunk_size(self) -> int:
        line = self._stream.readline(65537)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while self._stream.readline(65537) not in (b"\r\n", b"\n", b""):
                pass
        return size

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all remaining when negative); b"" at the end."""
        parts: list[bytes] = []
        wanted = size
        while not self._done and wanted != 0:
            if self._left == 0:
                self._left = self._next_chunk_size()
                if self._left == 0:
                    self._done = True
                    break
            step = self._left if wanted < 0 else min(self._left, wanted)
            data = self._stream.read(min(step, _CHUNK))
            if not data:
                self._done = True
                break
            parts.append(data)
            if self._on_read is not None:
                self._on_read(len(data))
            self._left -= len(data)
            if wanted > 0:
                wanted -= len(data)
            if self._left == 0 and self._chunked:
                self._stream.readline(65537)
            elif self._left == 0:
                self._done = True
        return b"".join(parts)

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


@dataclass
class Request:
    """A parsed request: ``segments`` are the decoded pieces of the path between slashes."""

    method: str
    raw_path: str
    path: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: Message
    body: RequestBody

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true", "yes")

    def json(self) -> Any:
        data = self.body.read()
        return json.loads(data) if data.strip() else {}

    def require_token(self) -> None:
        """Refuse (HTTP 401, as the Hub does) a request without a bearer token."""
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.body.drain()
            raise Unauthorized("Invalid credentials in Authorization header")


@dataclass(frozen=True)
class FileSlice:
    """A byte range of a file on disk, sent as a response body."""

    path: Path
    offset: int
    length: int


@dataclass
class Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | FileSlice = b""


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status=status,
        headers={"Content-Type": "application/json; charset=utf-8", **(headers or {})},
        body=json.dumps(data).encode(),
    )


Router = Callable[[Request], Response]


def _shortened(response: Response, keep: int) -> Response:
    """``response`` cut to its first ``keep`` body bytes, its headers saying so."""
    body = response.body
    headers = dict(response.headers)
    if isinstance(body, FileSlice):
        body = FileSlice(body.path, body.offset, min(keep, body.length))
        length = body.length
    else:
        body = body[:keep]
        length = len(body)
    if range_match := re.match(r"bytes (\d+)-\d+/(\d+)", headers.get("Content-Range", "")):
        first, total = int(range_match[1]), range_match[2]
        headers["Content-Range"] = f"bytes {first}-{first + length - 1}/{total}"
    return Response(status=response.status, headers=headers, body=body)


class HubHTTPServer(ThreadingHTTPServer):
    """Threaded server on 127.0.0.1 that knows its open connections (to cut them at stop)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, router: Router, faults: FaultPlan, link: Link | None = None) -> None:
        super().__init__(("127.0.0.1", 0), HubRequestHandler)
        self.router = router
        self.faults = faults
        self.link = link or Link()
        self.internal_errors: list[str] = []
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def track(self, connection: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            if alive:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def cut_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubTestServer/1.0"
    timeout = 60
    server: HubHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, alive=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, alive=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to the server's log of records, not to stderr."""

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _serve(self) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        body = RequestBody(self.rfile, self.headers, self.server.link.received)
        transfer = self.server.link.begin(self.client_address[1], self.command, path)
        rule = self.server.faults.take(self.command, path)
        action = rule.action if rule is not None else None
        status: int | None = None
        sent = 0
        try:
            if rule is not None and rule.action == "status":
                body.drain()
                status = rule.status
                sent = self._send(
                    json_response(
                        {"error": f"Injected failure (HTTP {rule.status})"},
                        status=rule.status,
                        headers=rule.headers,
                    )
                )
            elif rule is not None and rule.action == "drop_request":
                body.read(rule.after_bytes)
                self._abort(rule.reset)
            else:
                request = Request(
                    method=self.command,
                    raw_path=split.path,
                    path=path,
                    segments=[unquote(part) for part in split.path.split("/")[1:]],
                    query=parse_qs(split.query, keep_blank_values=True),
                    headers=self.headers,
                    body=body,
                )
                response = self._route(request)
                body.drain()
                status = response.status
                if rule is not None and rule.action == "lose_response":
                    self._abort(rule.reset)
                else:
                    if rule is not None and rule.action == "short_range":
                        response = _shortened(response, rule.after_bytes)
                    elif rule is not None and rule.action == "rewrite_headers":
                        response.headers.update(rule.headers)
                    sent = self._send(response, rule if action == "drop_response" else None)
        finally:
            self.server.link.end(transfer)
            self.server.faults.record(
                RequestRecord(
                    method=self.command,
                    path=path,
                    query=parse_qs(split.query),
                    headers={name.lower(): value for name, value in self.headers.items()},
                    status=status,
                    fault=action,
                    body_bytes=sent,
                )
            )

    def _route(self, request: Request) -> Response:
        try:
            return self.server.router(request)
        except Exception:
            error = traceback.format_exc()
            self.server.internal_errors.append(error)
            return json_response({"error": error}, status=500)

    def _send(self, response: Response, drop: FaultRule | None = None) -> int:
        """Send ``response``; returns the bytes of body written."""
        body = response.body
        length = body.length if isinstance(body, FileSlice) else len(body)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        budget = length if drop is None else min(drop.after_bytes, length)
        sent = 0
        if self.command != "HEAD":
            if isinstance(body, FileSlice):
                with body.path.open("rb") as source:
                    source.seek(body.offset)
                    left = budget
                    while left > 0 and (chunk := source.read(min(_CHUNK, left))):
                        self.server.link.sent(len(chunk))
                        self.wfile.write(chunk)
                        left -= len(chunk)
                        sent += len(chunk)
            else:
                for start in range(0, budget, _CHUNK):
                    self.server.link.sent(min(_CHUNK, budget - start))
                    self.wfile.write(body[start:min(start + _CHUNK, budget)])
                sent = budget
        if drop is not None:
            self._abort(drop.reset)
        return sent

    def _abort(self, reset: bool) -> None:
        """Close the connection now: a FIN, or a TCP reset (linger 0) when ``reset``."""
        self.close_connection = True
        try:
            self.wfile.flush()
            if reset:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()
