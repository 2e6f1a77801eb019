"""An endpoint pool for the server backends (``tgi``, ``openai``): several replicas of one model, one backend.

Recipe: ``backend_options.endpoints: [http://node1:8080, http://node2:8080]`` (or a string: URLs separated by
commas or spaces, or the path of a file holding one URL a line, ``#`` comments), else ``--endpoint a,b,c``,
else the environment variable ``MAGPIE_TGI_ENDPOINTS`` / ``MAGPIE_OPENAI_ENDPOINTS`` (same string forms).

- Start: every endpoint is probed (TGI: ``GET /health`` + ``/info``; OpenAI-compatible: ``GET /v1/models``);
  all that answer must serve the same model (else one line naming the odd one), and the backend's usual
  checks (recipe model, BOS, prompt limits) run against the first live one. One that does not answer yet is
  left out and re-probed; none answering is an error.
- Weights and routing: each endpoint takes at most its own ``max_concurrent_requests`` (``/info``; else the
  ``max_concurrency`` option, which also caps it, else the backend's default) requests at once; a request
  goes to the live endpoint with the fewest outstanding requests relative to that capacity.
- Failover: a connection failure (refused, reset, dropped mid-answer) takes the endpoint out at once;
  ``max_strikes`` consecutive 5xx answers or timeouts do too. Its in-flight requests are re-sent to the other
  endpoints at once (no retry spent); other failures go back to the backend's retry loop. An endpoint taken
  out is re-probed with exponential backoff (``probe_base``..``probe_cap`` s) and rejoins when it answers
  with the same model. The run stops (one line) only when no endpoint has been up for ``pool_down_s``.
- Figures: :meth:`EndpointPool.status` (per endpoint: state, capacity, in flight, requests, failures, times
  taken out, tokens, tokens/s) feeds the build's live progress and the manifest (``backend.info.pool``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field

from magpie_hub.errors import BackendError, RecipeError
from magpie_hub.generate.backends.http.base import HTTPBackend, HTTPOptions, one_line, public_url
from magpie_hub.retry import http_status

log = logging.getLogger(__name__)
STRIKE_STATUS = frozenset({500, 502, 503, 504})


class PoolOptions(HTTPOptions):
    """Options of a server backend that can spread its requests over several endpoints."""

    endpoints: list[str] | str | None = None   # URLs, "a,b c", or a file of URLs; else {ENV}S
    pool_down_s: float = Field(300.0, ge=0)    # stop when no endpoint has been up this long
    probe_base: float = Field(1.0, gt=0)       # re-probe backoff of an endpoint taken out
    probe_cap: float = Field(30.0, gt=0)
    max_strikes: int = Field(3, ge=1)          # consecutive 5xx / timeouts that take an endpoint out


class Unreachable(Exception):
    """An endpoint did not answer its status route (refused, reset, 503 starting): it is down, not wrong."""


def parse_endpoints(value: str | list[str] | None) -> list[str]:
    """URLs from a list, a string of URLs (commas / whitespace) or the path of a file of URLs."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text and "://" not in text and Path(text).is_file():
            text = "\n".join(line.split("#", 1)[0] for line in Path(text).read_text(encoding="utf-8").splitlines())
        elif text and "://" not in text:
            raise RecipeError(f"endpoints: {text!r} is neither a file of URLs nor a list of http(s):// URLs")
        value = re.split(r"[\s,]+", text)
    urls = list(dict.fromkeys(u.strip().rstrip("/") for u in value if u and u.strip()))
    for url in urls:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise RecipeError(f"endpoints: {public_url(url)!r} is not an http(s):// URL")
    return urls


@dataclass
class Member:
    """One endpoint of the pool and its figures."""

    base: str                                   # the URL requests go to (may carry credentials)
    url: str                                    # the same, safe to show
    capacity: int = 0
    state: str = "starting"                     # up | down | refused (serves another model)
    client: Any = None
    model: str | None = None
    outstanding: int = 0
    requests: int = 0
    ok: int = 0
    failures: int = 0
    resent: int = 0
    downs: int = 0
    strikes: int = 0
    tokens: int = 0
    reason: str = ""
    up_since: float | None = None
    up_s: float = 0.0
    probe: asyncio.Task | None = field(default=None, repr=False)

    def uptime(self, now: float) -> float:
        return self.up_s + (now - self.up_since if self.up_since is not None else 0.0)


class EndpointPool:
    """Weighted least-outstanding routing with failover over ``urls`` for ``backend`` (a :class:`PooledBackend`)."""

    def __init__(self, backend: PooledBackend, urls: list[str], opts: PoolOptions):
        self.backend = backend
        self.members = [Member(base=u, url=public_url(u)) for u in urls]
        self.down_s, self.max_strikes = float(opts.pool_down_s), int(opts.max_strikes)
        self.probe_base, self.probe_cap = float(opts.probe_base), float(opts.probe_cap)
        self.cap_option = opts.max_concurrency
        self.identity: tuple | None = None
        self._cond: asyncio.Condition | None = None
        self._started = time.monotonic()
        self._closed = False

    # ------------------------------------------------------------------------------------ start / stop
    async def start(self) -> Member:
        """Probe every endpoint; check they serve one model; return the first live member."""
        self._cond = asyncio.Condition()
        self._started = time.monotonic()
        infos = await asyncio.gather(*(self._first_probe(m) for m in self.members))
        live = [(m, info) for m, info in zip(self.members, infos, strict=True) if info is not None]
        if not live:
            reasons = "; ".join(f"{m.url}: {m.reason}" for m in self.members)
            raise BackendError(f"none of the {len(self.members)} endpoints of the pool answers ({one_line(reasons, 300)}); "
                               "check the URLs and that the servers are running")
        groups: dict[tuple, list[Member]] = {}
        for m, info in live:
            groups.setdefault(self.backend._served_identity(info), []).append(m)
        if len(groups) > 1:
            ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
            (main_id, main), (odd_id, odd) = ranked[0], ranked[-1]
            raise BackendError(f"endpoint pool: all endpoints must serve the same model, but {', '.join(m.url for m in odd)} "
                               f"serves {_show(odd_id)} while {', '.join(m.url for m in main)} serves {_show(main_id)}; "
                               "remove the odd endpoint or point it at the same model")
        self.identity = next(iter(groups))
        for m, info in live:
            await self._join(m, info)
        known = [m.capacity for m in self.members if m.capacity]
        for m in self.members:
            if m.state != "up":
                m.capacity = sorted(known)[len(known) // 2]     # until it answers: the median of the others
                log.warning("endpoint pool: %s is down at start (%s); it joins when it answers", m.url, m.reason)
                self._schedule_probe(m)
        return live[0][0]

    async def _first_probe(self, m: Member) -> dict | None:
        """The endpoint's info; a server that is starting (503, refused) gets a few seconds."""
        for delay in (0.5, 1.0, 2.0, None):
            try:
                return await self.backend._probe_endpoint(m.base)
            except Unreachable as exc:
                m.reason, m.state = one_line(exc, 120), "down"
                if delay is None:
                    return None
                await asyncio.sleep(delay)
        return None

    async def _join(self, m: Member, info: dict) -> None:
        own = info.get("max_concurrent_requests")
        cap = [c for c in (own, self.cap_option) if c]
        m.capacity = int(min(cap)) if cap else int(self.backend.default_concurrency)
        m.model = str(info.get("model_id"))
        if m.client is None:
            m.client = await self.backend._open_client(m.base, m.capacity)
        m.state, m.strikes, m.reason, m.up_since = "up", 0, "", time.monotonic()

    def total_capacity(self) -> int:
        return sum(m.capacity for m in self.members if m.state != "refused")

    async def close(self) -> None:
        self._closed = True
        for m in self.members:
            if m.probe is not None:
                m.probe.cancel()
            if m.client is not None:
                await self.backend._close_client(m.client)
                m.client = None
        if self.members:
            log.info("endpoint pool: %s", "; ".join(f"{s['url']} {s['state']} ok={s['ok']} tok/s={s['tokens_per_s']}"
                                                     for s in self.status()))

    # ------------------------------------------------------------------------------------ routing
    async def send(self, call: Callable[[Any], Awaitable[Any]], tokens_of: Callable[[Any], int]) -> Any:
        """``call(client)`` on the least loaded live endpoint; an endpoint failure re-sends it elsewhere."""
        while True:
            m = await self._acquire()
            try:
                out = await call(m.client)
            except Exception as exc:
                kind = self._failure(exc)
                if kind is None:
                    raise
                m.failures += 1
                m.strikes += 1
                if kind == "down" or m.strikes >= self.max_strikes:
                    self._take_out(m, f"{type(exc).__name__}: {one_line(exc, 100)}" if kind == "down"
                                   else f"{m.strikes} failures in a row ({one_line(exc, 80)})")
                    m.resent += 1
                    continue                                    # in flight on a lost endpoint: send it elsewhere
                raise
            finally:
                await self._release(m)
            m.ok += 1
            m.strikes = 0
            m.tokens += int(tokens_of(out) or 0)
            return out

    async def _acquire(self) -> Member:
        async with self._cond:
            down_since = None
            while True:
                free = [m for m in self.members if m.state == "up" and m.outstanding < m.capacity]
                if free:
                    m = min(free, key=lambda x: (x.outstanding / x.capacity, -x.capacity))
                    m.outstanding += 1
                    m.requests += 1
                    return m
                if any(m.state == "up" for m in self.members):
                    await self._cond.wait()
                    continue
                down_since = down_since or time.monotonic()
                left = self.down_s - (time.monotonic() - down_since)
                if left <= 0:
                    reasons = "; ".join(f"{m.url}: {m.reason}" for m in self.members)
                    raise BackendError(f"lost every endpoint of the pool for {self.down_s:g}s ({one_line(reasons, 300)}); "
                                       "restart the servers and re-run to resume")
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout=min(left, 5.0))
                except asyncio.TimeoutError:
                    pass

    async def _release(self, m: Member) -> None:
        m.outstanding -= 1
        async with self._cond:
            self._cond.notify(1)

    def _failure(self, exc: Exception) -> str | None:
        """"down" (the endpoint is gone), "strike" (5xx, timeout) or None (the request's own problem)."""
        import httpx2
        from huggingface_hub.errors import InferenceTimeoutError

        if isinstance(exc, httpx2.TimeoutException) and not isinstance(exc, httpx2.ConnectTimeout):
            return "strike"
        if isinstance(exc, (httpx2.TransportError, ConnectionError)):
            return "down"
        if isinstance(exc, (InferenceTimeoutError, asyncio.TimeoutError)) or http_status(exc) in STRIKE_STATUS:
            return "strike"
        return None

    # ------------------------------------------------------------------------------------ failover
    def _take_out(self, m: Member, reason: str) -> None:
        if m.state != "up":
            return
        now = time.monotonic()
        m.up_s += now - (m.up_since or now)
        m.state, m.up_since, m.reason = "down", None, reason
        m.downs += 1
        log.warning("endpoint pool: %s taken out (%s); its requests go to the other endpoints", m.url, reason)
        self._schedule_probe(m)

    def _schedule_probe(self, m: Member) -> None:
        if not self._closed and (m.probe is None or m.probe.done()):
            m.probe = asyncio.ensure_future(self._probe_loop(m))

    async def _probe_loop(self, m: Member) -> None:
        delay = self.probe_base
        while not self._closed:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(self.probe_cap, delay * 2)
            try:
                info = await self.backend._probe_endpoint(m.base)
            except (Unreachable, BackendError) as exc:
                m.reason = one_line(exc, 120)
                continue
            if self.backend._served_identity(info) != self.identity:
                m.state, m.reason = "refused", f"serves {_show(self.backend._served_identity(info))}"
                log.warning("endpoint pool: %s now serves %s, not %s: left out", m.url,
                            _show(self.backend._served_identity(info)), _show(self.identity))
                return
            await self._join(m, info)
            log.warning("endpoint pool: %s is back (capacity %d)", m.url, m.capacity)
            async with self._cond:
                self._cond.notify_all()
            return

    # ------------------------------------------------------------------------------------ figures
    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        elapsed = max(now - self._started, 1e-6)
        return [{"url": m.url, "state": m.state, "capacity": m.capacity, "in_flight": m.outstanding,
                 "requests": m.requests, "ok": m.ok, "failures": m.failures, "resent": m.resent,
                 "taken_out": m.downs, "tokens": m.tokens, "tokens_per_s": round(m.tokens / elapsed, 1),
                 "requests_per_s": round(m.ok / elapsed, 2), "up_s": round(m.uptime(now), 1),
                 **({"reason": m.reason} if m.state != "up" and m.reason else {})} for m in self.members]


def _show(identity: tuple | None) -> str:
    return " ".join(repr(p) if i == 0 else f"@{str(p)[:12]}" for i, p in enumerate(identity or ()) if p)


class PooledBackend(HTTPBackend):
    """A server backend with an optional :class:`EndpointPool`. Subclasses give ``_probe_endpoint(base)``
    (one status read, :class:`Unreachable` when down), ``_served_identity(info)``, ``_open_client(base, n)``,
    ``_close_client(client)``, and route ``_send`` through :meth:`_pooled` when ``self.pool`` is set."""

    Options = PoolOptions

    def __init__(self, model: str, *, revision: str | None = None, **options):
        opts = self.parse_options(options)
        urls = parse_endpoints(opts.endpoints)
        if not urls and opts.endpoint and "," in opts.endpoint:
            urls = parse_endpoints(opts.endpoint)
        if not urls and not opts.endpoint and os.environ.get(f"{self.env_var}S"):
            urls = parse_endpoints(os.environ[f"{self.env_var}S"])
        urls = [self._normalise_endpoint(u) or u for u in urls]
        if urls:
            options = {**options, "endpoint": urls[0], "endpoints": None}
        super().__init__(model, revision=revision, **options)
        self.pool = EndpointPool(self, urls, self.options) if urls else None

    async def _start_pool(self) -> None:
        """Probe the pool; the backend's own checks then run against its first live endpoint."""
        if self.pool is not None:
            first = await self.pool.start()
            self.endpoint, self.url = first.base, first.url

    def _init_concurrency(self) -> None:
        if self.pool is None:
            return super()._init_concurrency()
        self.max_concurrency = self.pool.total_capacity()
        self._sem = asyncio.Semaphore(self.max_concurrency)

    async def _pooled(self, call: Callable[[Any], Awaitable[Any]]) -> Any:
        return await self.pool.send(call, self._tokens_of)

    def _tokens_of(self, out: Any) -> int:
        return 0

    def _classify(self, exc: Exception):
        if isinstance(exc, BackendError):      # the pool's own verdict (every endpoint lost): as it is
            raise exc
        return super()._classify(exc)

    async def _close_pool(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def _close_client(self, client: Any) -> None:
        await client.aclose()

    def pool_status(self) -> list[dict[str, Any]] | None:
        return self.pool.status() if self.pool is not None else None

    def info(self):
        info = super().info()
        if self.pool is not None:
            info.extra["endpoint"] = [m.url for m in self.pool.members]
            info.extra["pool"] = self.pool.status()
        return info
