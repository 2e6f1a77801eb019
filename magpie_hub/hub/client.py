"""Hub access for publish/versions/diff: token, endpoint, client, and one retry policy.

Token, in order: ``HF_TOKEN`` in the environment, ``HF_TOKEN`` in ``./.env`` (python-dotenv; variables
already set win), then the huggingface_hub login (``hf auth login``). It is handed to huggingface_hub
only: never printed, logged, written, or put in an exception message.

:func:`load_env` must run before huggingface_hub is imported (it reads ``HF_ENDPOINT`` at import time);
the callers import it lazily after. ``HF_HUB_DISABLE_XET`` is the user's choice and is honoured (also from
``.env``): the public Hub stores uploads through Xet; a Hub that offers no Xet (a private mirror, the
test Hub) needs ``HF_HUB_DISABLE_XET=1``, which :func:`call` says in one line when it sees that failure.

:func:`call` retries transient failures (429, 408, 5xx, dropped connections) with exponential backoff and
jitter (``MAGPIE_HUB_RETRIES`` tries after the first, default 5; the loop of :mod:`magpie_hub.retry`) and
fails fast, in one line, on everything else (401, 403, 404, conflicts), told apart by the
``huggingface_hub.errors`` type of the failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from magpie_hub import __version__
from magpie_hub.errors import HubError, env_file_values, read_secret, redact, register_secret
from magpie_hub.retry import (
    RETRYABLE_STATUS,
    RetriesExhausted,
    RetryPolicy,
    Transient,
    attribute,
    exception_chain,
    retry_after,
    retry_sync,
)

T = TypeVar("T")
_XET_ENDPOINT = "xet-write-token"  # asked first by Xet uploads; a Hub without Xet answers 404


class HubUnavailableError(HubError):
    """The Hub kept failing transiently (after retries); re-running the same command resumes."""

    exit_code = 1


class ConcurrentPushError(HubError):
    """The branch moved between reading its head and committing (``parent_commit`` is stale)."""


def load_env() -> None:
    """Load ``./.env`` into the environment (never overriding) and honour its HF_HUB_DISABLE_XET."""
    for name, value in env_file_values(Path.cwd() / ".env").items():
        os.environ.setdefault(name, value)
    if "huggingface_hub" in sys.modules:  # imported before .env was read: apply the user's setting now
        from huggingface_hub import constants

        constants.HF_HUB_DISABLE_XET = os.environ.get("HF_HUB_DISABLE_XET", "").upper() in {"1", "ON", "YES", "TRUE"}


def endpoint() -> str:
    """The Hub base URL: ``HF_ENDPOINT`` (environment or .env), else huggingface_hub's default."""
    load_env()
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_token() -> str | None:
    """The Hub token from HF_TOKEN, ./.env or the huggingface_hub login; None when there is none."""
    load_env()
    token = read_secret("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    from huggingface_hub import get_token

    token = get_token()
    register_secret(token)
    return token


def hub_api(token: str | None):
    """An ``HfApi`` bound to :func:`endpoint` and ``token``."""
    from huggingface_hub import HfApi

    register_secret(token)     # whatever its source or shape, redact() hides it from every message
    return HfApi(endpoint=endpoint(), token=token, library_name="magpie-hub", library_version=__version__)


def max_retries() -> int:
    try:
        return max(0, int(os.environ.get("MAGPIE_HUB_RETRIES", "5")))
    except ValueError:
        raise HubError("MAGPIE_HUB_RETRIES must be an integer (number of retries)") from None


def _status(exc: BaseException) -> int | None:
    return attribute(attribute(exc, "response"), "status_code")


def is_transient(exc: BaseException) -> tuple[bool, float | None]:
    """(retry?, Retry-After seconds) for an exception raised by huggingface_hub / its HTTP client."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    for e in exception_chain(exc):
        if isinstance(e, OfflineModeIsEnabled) or _XET_ENDPOINT in str(e):
            return False, None
        status = _status(e)
        if status is not None:
            return status in RETRYABLE_STATUS, retry_after(attribute(e, "response"))
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True, None
    return False, None


def _describe(exc: BaseException) -> str:
    for e in exception_chain(exc):
        status = _status(e)
        if status is not None:
            msg = attribute(e, "server_message") or attribute(attribute(e, "response"), "reason_phrase") or ""
            return " ".join(f"HTTP {status}{': ' + msg if msg else ''}".split())
    return " ".join(f"{type(exc).__name__}: {exc}".split()).rstrip(": ")[:300]


def translate(exc: BaseException, what: str, repo: str) -> HubError:
    """One-line HubError naming the fix for a failed Hub call."""
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    for e in exception_chain(exc):
        url = str(attribute(attribute(e, "request"), "url") or "")
        status = _status(e)
        if isinstance(e, OfflineModeIsEnabled):
            return HubError(f"{what}: HF_HUB_OFFLINE=1 is set; unset it to reach the Hub")
        if _XET_ENDPOINT in url or _XET_ENDPOINT in str(e):
            return HubError(f"{what}: the Hub at {endpoint()} does not offer Xet storage; "
                            f"set HF_HUB_DISABLE_XET=1 to upload over plain LFS")
        if isinstance(e, GatedRepoError):
            return HubError(f"{what}: repository {repo} is gated (HTTP {status}); accept its access conditions "
                            f"on the Hub with the token's account")
        if status == 401 or (status == 404 and isinstance(e, RepositoryNotFoundError)):
            if status == 401 and (attribute(attribute(e, "response"), "headers") or {}).get("X-Error-Code") \
                    != "RepoNotFound":
                return HubError(f"{what}: the Hub rejected the token (HTTP 401); set a valid write token "
                                f"in HF_TOKEN, ./.env or with `hf auth login`")
            return HubError(f"{what}: repository {repo} not found or not visible to this token (check ORG/NAME "
                            f"and the token's access)")
        if status == 403:
            return HubError(f"{what}: the token may not write to {repo} (HTTP 403); use a token with write "
                            f"access to that namespace")
        if status == 404 and isinstance(e, RevisionNotFoundError):
            return HubError(f"{what}: revision not found in {repo} (HTTP 404); check the branch or tag name")
        if status == 404:
            return HubError(f"{what}: not found (HTTP 404); check {repo} and the revision")
        if status == 412:
            return ConcurrentPushError(f"{what}: {repo} changed since this publish read it (someone else "
                                       f"pushed); re-run the same command to publish on top of it")
        if isinstance(e, ValueError) and "metadata in README.md" in str(e):
            return HubError(f"{what}: the Hub rejected README.md's YAML ({' '.join(str(e).split())[:200]}); "
                            f"re-render it with `magpie-hub card DIR`")
    return HubError(f"{what} failed: {_describe(exc)}")


def call(what: str, repo: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` with retries on transient Hub failures; anything else becomes one-line HubError.

    ``fn`` must be safe to call again (the caller rebuilds non-reusable objects inside it).
    """
    retries = max_retries()

    def classify(exc: Exception) -> Transient:
        if isinstance(exc, (HubError, MemoryError)):
            raise exc
        transient, wait = is_transient(exc)
        if not transient:
            raise translate(exc, what, repo) from None
        return Transient(redact(_describe(exc)), wait)

    def warn(failure: Transient, attempt: int, delay: float | None) -> None:
        if delay is not None:
            print(f"warning: {what}: {failure.reason}; retry {attempt + 1}/{retries} in {delay:.1f}s",
                  file=sys.stderr)

    try:
        return retry_sync(lambda: fn(*args, **kwargs), RetryPolicy(retries, base=1.0, cap=60.0), classify, warn)
    except RetriesExhausted as exc:
        raise HubUnavailableError(
            f"{what}: the Hub kept failing ({exc.failure.reason}) after {retries + 1} tries; "
            f"re-run the same command (nothing was tagged; uploaded files are kept and skipped)") from None
