"""Exponential backoff with jitter, shared by the network-facing stages (TGI backend, publishing).

``backoff_delay(attempt)`` gives the wait before retry number ``attempt`` (0-based): "equal jitter",
i.e. half of ``min(cap, base * 2**attempt)`` plus a uniform random part of the other half, so
concurrent clients that failed together do not retry together, yet every wait grows. A server's
``Retry-After`` header (seconds or an HTTP date) raises the wait to at least what it asks, capped.
"""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

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
