"""Calls to the Hugging Face Hub: retries of transient failures, one error line for the rest.

huggingface_hub retries some failures itself and not others. In huggingface_hub 2.4
(``file_download.http_get``) a file GET answered 503 fails at once (only 408 and 429 are
retried there), and a TCP reset mid-download (``httpx2.ReadError``) propagates (only
``ConnectError``, ``TimeoutException`` and ``RemoteProtocolError`` resume the download);
``HfApi.list_repo_refs`` and ``HfApi.create_commit`` send a single request through
``get_session()`` with no retry at all. :func:`retry` wraps any such call: it repeats it on
the same transient failures the client's own ``utils/_http.py`` ``http_backoff`` retries
(HTTP 408, 429 and 5xx gateway errors; timeouts, network errors, truncated responses), with
exponential backoff, jitter, and the server's ``Retry-After`` honoured.

Only idempotent calls may be wrapped blindly: a commit whose response was lost has landed,
so publishing code must check the remote state before it commits again.
"""

from __future__ import annotations

import importlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from exporter.errors import ExporterError, OptionsError, PublishError

log = logging.getLogger(__name__)

T = TypeVar("T")



@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient Hub errors (see :func:`retry`).

    Attributes:
        attempts: tries per operation, the first included.
        base_delay: seconds before the first retry, doubled for each further one.
        max_delay: the longest wait, a server's ``Retry-After`` included.
    """

    attempts: int = 6
    base_delay: float = 2.0
    max_delay: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must not be negative")


#: Statuses worth another try: the set huggingface_hub's ``http_backoff`` retries by default.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

# Transport failures by HTTP library: huggingface_hub 2.x uses httpx2, 1.x httpx, 0.x requests.
# These are the classes its ``_DEFAULT_RETRY_ON_EXCEPTIONS`` lists (timeouts, network errors
# such as a connection reset, a response cut short).
_TRANSPORT_ERRORS = {
    "httpx2": ("TimeoutException", "NetworkError", "RemoteProtocolError"),
    "httpx": ("TimeoutException", "NetworkError", "RemoteProtocolError"),
    "requests": ("Timeout", "ConnectionError", "exceptions.ChunkedEncodingError"),
}


def _load_transport_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for module_name, names in _TRANSPORT_ERRORS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            target: object = module
            for part in name.split("."):
                target = getattr(target, part, None)
            if isinstance(target, type) and issubclass(target, BaseException):
                found.append(target)
    return tuple(found)


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = _load_transport_errors()


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is a failure that the same request may not meet again.

    True for :class:`huggingface_hub.errors.HfHubHTTPError` with a status in
    :data:`RETRY_STATUSES`, for the HTTP library's transport errors (timeouts, connection
    resets, responses cut short), and for errors caused by either: ``hf_hub_download`` turns a
    failed metadata request into ``LocalEntryNotFoundError`` (or ``ValueError`` when forced)
    raised from the real failure (``file_download._raise_on_head_call_error``).
    """
    return transient_cause(error) is not None


def transient_cause(error: BaseException) -> BaseException | None:
    """The transient failure behind ``error`` (itself or an explicit cause), or None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, HfHubHTTPError):
            response = getattr(current, "response", None)
            if getattr(response, "status_code", None) in RETRY_STATUSES:
                return current
        elif isinstance(current, TRANSPORT_ERRORS):
            return current
        current = current.__cause__
    return None


def retry_after(error: BaseException, now: datetime | None = None) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: seconds or an HTTP date), if any."""
    response = getattr(error, "response", None)
    headers: Mapping[str, str] | None = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 60.0,
    error: type[ExporterError] = ExporterError,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient Hub failures.

    The n-th retry waits a random time between half and all of ``base_delay * 2**(n-1)``
    (jitter keeps parallel workers from retrying in step), or the server's ``Retry-After``
    when it sends one; never more than ``max_delay``. Other exceptions propagate unchanged.

    Args:
        fn: the call, without arguments (use a lambda or ``functools.partial``).
        what: what the call does, for messages ("list the branches of hf://org/name").
        attempts: calls in all, at least 1.
        base_delay: seconds before the first retry.
        max_delay: the longest wait between two calls.
        error: the :class:`ExporterError` subclass raised when every attempt failed.
        sleep: waits the given seconds (replaceable in tests).

    Returns:
        What ``fn`` returned.

    Raises:
        ExporterError: (``error``) every attempt met a transient failure; the last one is
            chained as the cause.

    Example:
        >>> import httpx2
        >>> failures = [httpx2.ReadError("connection reset by peer")]
        >>> def download() -> str:
        ...     if failures:
        ...         raise failures.pop()
        ...     return "layer_00-model_00-model_states.pt"
        >>> retry(download, what="download layer 0", sleep=lambda seconds: None)
        'layer_00-model_00-model_states.pt'
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            cause = transient_cause(exc)
            if cause is None:
                raise
            if attempt >= attempts:
                raise error(
                    f"could not {what}: {_describe(cause)} (gave up after {attempts} attempts)"
                ) from exc
            backoff = base_delay * 2 ** (attempt - 1)
            asked = retry_after(cause)
            if asked is None:
                asked = random.uniform(backoff / 2, backoff)
            delay = min(max_delay, asked)
            log.warning(
                "could not %s (%s); retry %d of %d in %.1f s",
                what,
                _describe(cause),
                attempt,
                attempts - 1,
                delay,
            )
            sleep(delay)
            attempt += 1


def hub_call(
    fn: Callable[[], T],
    *,
    what: str,
    repo_id: str,
    policy: RetryPolicy,
    error: type[ExporterError],
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn`` with transient failures retried (:func:`retry`) and the client's errors turned
    into one ``error`` line that says what to do.

    Errors that are not the Hub client's (a local file that cannot be read, a bug) propagate.
    """
    try:
        return retry(fn, what=what, attempts=policy.attempts, base_delay=policy.base_delay,
                     max_delay=policy.max_delay, error=error, sleep=sleep)
    except LocalTokenNotFoundError as exc:
        raise error(f"could not {what}: {NO_TOKEN}") from exc
    except OfflineModeIsEnabled as exc:
        raise error(
            f"could not {what}: offline mode (HF_HUB_OFFLINE) is set; unset it to reach the Hub"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise error(
            f"could not {what}: repository {repo_id} not found (if it is private or gated, set "
            f"HF_TOKEN to a token that can read it, or run `hf auth login`)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise error(f"could not {what}: revision not found") from exc
    except RemoteEntryNotFoundError as exc:
        raise error(f"could not {what}: no such file at that commit") from exc
    except LocalEntryNotFoundError as exc:
        raise error(f"could not {what}: {str(exc).splitlines()[0]}") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise error(
                f"could not {what}: HTTP {status}, not authorised (set HF_TOKEN to a token "
                f"with access to {repo_id}, or run `hf auth login`)"
            ) from exc
        detail = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
        raise error(f"could not {what}: HTTP {status}: {detail}") from exc


#: What to do when a write finds no token (the commands huggingface_hub documents).
NO_TOKEN = "no Hub token found: set HF_TOKEN to a token with write access, or run `hf auth login`"


def check_token_text(token: str) -> str:
    """``token`` if it can go in an ``Authorization`` header; an OptionsError otherwise.

    An empty token or one with spaces or line breaks (a paste accident) would fail deep in the
    HTTP library with ``Illegal header value``.
    """
    if not token.strip():
        raise OptionsError("the token is empty; give a Hub token (hf_...), or leave --token out "
                           "to use HF_TOKEN or the token saved by `hf auth login`")
    if token != token.strip() or any(c.isspace() or not c.isprintable() or not c.isascii()
                                     for c in token):
        raise OptionsError("the token holds spaces, line breaks or other characters a Hub token "
                           "never has; copy it again from your Hub settings (Access Tokens)")
    return token


def require_token(token: str | None) -> str:
    """The token a write will use: ``token``, else ``HF_TOKEN`` or the saved login.

    Raises:
        PublishError: there is none (:data:`NO_TOKEN` says what to do), or it is malformed.
    """
    from huggingface_hub import get_token

    found = token if token is not None else get_token()
    if found is None:
        raise PublishError(NO_TOKEN)
    try:
        return check_token_text(found)
    except OptionsError as exc:
        where = "--token" if token is not None else "HF_TOKEN (or the saved login)"
        raise PublishError(f"{where}: {exc}") from None


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it names a Hub repository (``ORG/NAME``); an OptionsError otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise OptionsError(f"{repo_id!r} is not a Hub repository id: {exc}") from None
    if "/" not in repo_id:
        raise OptionsError(f"{repo_id!r}: give the repository as ORG/NAME")
    return repo_id


def _describe(error: BaseException) -> str:
    """One line naming the failure: the HTTP status, or the transport error's class and text."""
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        return f"HTTP {status}" if status is not None else type(error).__name__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
