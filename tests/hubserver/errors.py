"""Errors the test Hub server answers with, as HTTP statuses and Hub error codes.

The codes go into the ``X-Error-Code`` header, which huggingface_hub maps to its own errors
(``utils/_http.py``, ``hf_raise_for_status``: RepoNotFound, RevisionNotFound, EntryNotFound).
"""

from __future__ import annotations

from collections.abc import Mapping


class HubError(Exception):
    """An error the server reports to the client as an HTTP status (and Hub error code)."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class RepoNotFound(HubError):
    status = 404
    code = "RepoNotFound"


class RevisionNotFound(HubError):
    status = 404
    code = "RevisionNotFound"


class EntryNotFound(HubError):
    status = 404
    code = "EntryNotFound"


class Conflict(HubError):
    status = 409


class PreconditionFailed(HubError):
    status = 412


class Unprocessable(HubError):
    status = 422


class BadRequest(HubError):
    status = 400


class Unauthorized(HubError):
    status = 401


class UnknownRoute(HubError):
    status = 404


class RangeNotSatisfiable(HubError):
    status = 416
