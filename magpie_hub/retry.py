"""The one retry loop of the network-facing code (Hub client, HTTP generation backends) and its helpers.

:func:`retry_async` / :func:`retry_sync` run a call until it succeeds, retrying the failures that
``classify`` calls transient (it returns a :class:`Transient`) and letting every other exception through
(``classify`` raises it, usually translated into a one-line error). Waits follow
:func:`backoff_delay`: "equal jitter", i.e. half of ``min(cap, base * 2**attempt)`` plus a uniform random
part of the other half, so concurrent clients that failed together do not retry together, yet every wait
grows; a server's ``Retry-After`` (seconds or an HTTP date) raises the wait to what it asks, capped. When
the retries are spent the loop raises :class:`RetriesExhausted` with the last failure.

:func:`http_response` / :func:`http_status` read the HTTP answer behind an exception of huggingface_hub or
httpx (on the exception or one it was raised from).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 424, 429, 500, 502, 503, 504})
"""HTTP statuses worth retrying: timeouts, overload, gateway errors, a failed generation (TGI's 424)."""


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 30.0, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0 = first retry)."""
    ceiling = min(cap, base * (2 ** max(0, attempt)))
    delay = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, cap)
    return delay


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or HTTP-date); None when absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


# -- the HTTP answer behind an exception --------------------------------------------------------------------
def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else ``__context__``), once each."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def attribute(obj: Any, name: str) -> Any:
    """``obj.name`` or None (httpx raises RuntimeError for an unset ``.request``)."""
    try:
        return getattr(obj, name, None)
    except RuntimeError:
        return None


def http_response(exc: BaseException) -> Any:
    """The HTTP response carried by ``exc`` or the first exception of its chain that has one, else None."""
    for e in exception_chain(exc):
        response = attribute(e, "response")
        if attribute(response, "status_code") is not None:
            return response
    return None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of :func:`http_response`, None when the failure got no answer."""
    return attribute(http_response(exc), "status_code")


def retry_after(response: Any) -> float | None:
    """The ``Retry-After`` of a response, in seconds (None when absent)."""
    return parse_retry_after((attribute(response, "headers") or {}).get("Retry-After"))


# -- the loop -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transient:
    """A failure worth retrying: ``reason`` for messages and counters, the server's ``retry_after``."""

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` tries after the first, waiting :func:`backoff_delay` (``base``, ``cap``) between them."""

    retries: int
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, failure: Transient) -> float | None:
        """Seconds before retry ``attempt`` (0-based), None when the retries are spent."""
        if attempt >= self.retries:
            return None
        return backoff_delay(attempt, base=self.base, cap=self.cap, retry_after=failure.retry_after)


class RetriesExhausted(Exception):
    """Every try failed transiently; ``failure`` is the last one."""

    def __init__(self, failure: Transient, tries: int):
        super().__init__(f"{failure.reason} (after {tries} tries)")
        self.failure, self.tries = failure, tries


Classify = Callable[[Exception], Transient]
"""Transient failure -> :class:`Transient`; any other failure -> raise (the original or a translation)."""
OnFailure = Callable[[Transient, int, "float | None"], None]
"""Called for every transient failure with (failure, attempt, seconds before the retry or None if none)."""


async def _loop(call: Callable[[], Awaitable[T]], policy: RetryPolicy, classify: Classify,
                on_failure: OnFailure | None, sleep: Callable[[float], Awaitable[None]]) -> T:
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001 - classify() raises what is not transient
            failure = classify(exc)
        delay = policy.delay(attempt, failure)
        if on_failure is not None:
            on_failure(failure, attempt, delay)
        if delay is None:
            raise RetriesExhausted(failure, attempt + 1)
        await sleep(delay)
        attempt += 1


async def retry_async(call: Callable[[], Awaitable[T]], policy: RetryPolicy, classify: Classify,
                      on_failure: OnFailure | None = None) -> T:
    """Await ``call()`` under the retry loop (asyncio sleeps between tries)."""
    return await _loop(call, policy, classify, on_failure, asyncio.sleep)


def retry_sync(call: Callable[[], T], policy: RetryPolicy, classify: Classify,
               on_failure: OnFailure | None = None) -> T:
    """Run ``call()`` under the same loop, blocking: the loop's coroutine never suspends here (the call and
    the sleep are synchronous), so one ``send`` runs it to its end."""
    async def sync_call() -> T:
        return call()

    async def sync_sleep(seconds: float) -> None:
        time.sleep(seconds)

    loop = _loop(sync_call, policy, classify, on_failure, sync_sleep)
    try:
        loop.send(None)
    except StopIteration as done:
        return done.value
    loop.close()
    raise RuntimeError("retry_sync: the call awaited an event loop; use retry_async")
