"""What the server backends (``tgi``, ``openai``) share: options, startup checks, prompt fit, retries, errors.

:class:`HTTPBackend` holds everything but the server's protocol, which a subclass gives: ``start()``
(what is served, then :meth:`HTTPBackend._bos_to_strip` and :meth:`HTTPBackend._init_concurrency`),
``close()``, ``_tokenize_probe`` (the server's ids for "Hi"), ``_request_kwargs``, ``_send`` and
``_result``.

- Readiness: ``GET`` of a status route, with a few seconds for a server still starting (503, refused).
- Token: the ``token`` option (tgi) / ``api_key`` (openai), else the first of ``token_env`` in the
  environment or ``./.env``; sent only as the ``Authorization`` header, redacted from every message.
- BOS: the engine renders prompts from the model's own chat template, so a Llama-3 prompt starts with
  ``<|begin_of_text|>``; a server that tokenizes with special tokens added would give BOS twice. The
  server's ``/tokenize`` (else the local tokenizer) tells whether it adds BOS; if so the leading BOS text
  is stripped from every prompt.
- Prompt fit: ``max_input_tokens``/``max_total_tokens`` of the server bound every prompt (counted with the
  local tokenizer, special tokens added, only when the prompt could be too long); the token budget is
  clamped to the room left. A prompt that does not fit ends the run before any request succeeded (every
  prompt would fail), else it ends its conversation as truncated (``"length"``).
- Failures: 429/5xx/424, timeouts and connection resets are retried (the loop of :mod:`magpie_hub.retry`,
  ``max_retries``, backoff ``backoff_base``..``backoff_cap``); a request that still fails returns
  ``finish_reason="error"`` (the engine regenerates the conversation), or stops the run when the server
  refuses connections. 400/401/403/404 and 422 raise :class:`BackendError` at once (one line), and every
  other request of the run then waits to be cancelled: no retries against a dead or refusing server.
- Fail-fast: when every request over ``fail_fast_s`` (default 120 s; ``null``: never) has failed, the run
  stops with one line naming the endpoint and the last error, exit 1; finished rows stay for a resume.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import Counter
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field

from magpie_hub.errors import (
    BackendError,
    RecipeError,
    RemoteUnavailableError,
    read_secret,
    redact,
    register_secret,
)
from magpie_hub.generate.backends.base import (
    Backend,
    BackendInfo,
    BackendOptions,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    cut_at_stop,
)
from magpie_hub.retry import (
    RETRYABLE_STATUS,
    RetriesExhausted,
    RetryPolicy,
    Transient,
    http_response,
    retry_after,
    retry_async,
)

_TOO_LONG = re.compile(r"must have less than \d+ tokens|must be <= \d+\. Given: \d+ `inputs` tokens|"
                       r"maximum context length|exceeds the context size|context length", re.IGNORECASE)


def models_module():
    """:mod:`magpie_hub.models`, imported on first use: it imports transformers (seconds), and the recipe
    loader imports the backend modules at CLI start to validate their options."""
    from magpie_hub import models as loaded  # transformers: not at CLI start (see docstring)

    return loaded


def public_url(url: str) -> str:
    """``url`` without credentials or query string, safe for logs, manifests and messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def one_line(text: object, limit: int = 240) -> str:
    """``text`` redacted, on one line, at most ``limit`` characters."""
    text = " ".join(redact(str(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sampling_fields(params: SamplingParams, *, seed_bits: int) -> dict:
    """``temperature``, ``top_p`` (only when it truncates) and ``seed`` of a sampled (not greedy) request."""
    fields: dict = {"temperature": float(params.temperature)}
    if 0.0 < params.top_p < 1.0:
        fields["top_p"] = float(params.top_p)
    if params.seed is not None:
        fields["seed"] = int(params.seed) % (2**seed_bits)
    return fields


class HTTPOptions(BackendOptions):
    """Options of every server backend."""

    endpoint: str | None = None               # else the backend's environment variable
    max_concurrency: int | None = Field(None, ge=1)   # else the server's limit, else default_concurrency
    timeout: float = Field(120.0, ge=0.001)
    max_retries: int = Field(8, ge=0)
    check_model: bool = True
    backoff_base: float = Field(0.5, ge=0)
    backoff_cap: float = Field(30.0, ge=0)
    fail_fast_s: float | None = Field(120.0, gt=0)   # stop when every request over this window failed (None: never)


class TooLong(Exception):
    """The server refused a prompt for its length (its own count is the authority)."""


class _NotReady(Exception):
    """A status route answered 503: the server is still starting."""


class HTTPBackend(Backend):
    """A generation server as the backend: bounded concurrency, retries, validation of the server."""

    Options = HTTPOptions
    server_kind: ClassVar[str] = "server"
    env_var: ClassVar[str]                              # the endpoint's environment variable
    token_option: ClassVar[str]                         # the option that gives the token
    token_env: ClassVar[tuple[str, ...]]                # else where it comes from (first = the one to set)
    default_concurrency: ClassVar[int] = 64

    def __init__(self, model: str, *, revision: str | None = None, **options):
        self.options = opts = self.parse_options(options)
        self.log = logging.getLogger(type(self).__module__)
        endpoint = self._normalise_endpoint(opts.endpoint or os.environ.get(self.env_var))
        if not endpoint:
            raise RecipeError(f"the {self.name} backend needs a server URL: set backend_options.endpoint in the "
                              f"recipe, pass --endpoint URL or set {self.env_var}")
        if urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).hostname:
            raise RecipeError(f"{self.name} endpoint {public_url(endpoint)!r} is not an http(s):// URL "
                              "(give the server's base URL, e.g. http://127.0.0.1:8080)")
        self.model, self.revision = model, revision
        self.endpoint = endpoint.rstrip("/")
        self.url = public_url(self.endpoint)
        self.timeout, self.max_retries = float(opts.timeout), int(opts.max_retries)
        self.backoff_base, self.backoff_cap = float(opts.backoff_base), float(opts.backoff_cap)
        self.check_model = bool(opts.check_model)
        given = getattr(opts, self.token_option)
        register_secret(given)
        self._token = given or read_secret(*self.token_env)
        self._requested_concurrency = opts.max_concurrency
        self.server: dict = {}
        self.strip_prefix: str | None = None
        self.max_concurrency: int | None = None
        self.stats: Counter = Counter()
        self._tokenizer = None
        self._sem: asyncio.Semaphore | None = None
        self._succeeded = False
        self._fatal: BackendError | None = None
        self._last_ok: float | None = None       # last success (or first request): the fail-fast window
        self._fails_since_ok = 0

    def _normalise_endpoint(self, endpoint: str | None) -> str | None:
        return endpoint

    # ------------------------------------------------------------------------------------ startup
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def _get_ready(self, http, route: str):
        """GET ``route``; a server that is still starting (503, connection refused) gets a few seconds."""
        import httpx2

        async def get():
            resp = await http.get(route)
            if resp.status_code == 503:
                raise _NotReady(f"GET {route} -> 503 (server not ready)")
            return resp

        def classify(exc: Exception) -> Transient:
            if isinstance(exc, _NotReady):
                return Transient(str(exc))
            if isinstance(exc, httpx2.TransportError):
                return Transient(f"{type(exc).__name__}: {exc}")
            raise exc

        try:
            return await retry_async(get, RetryPolicy(3, base=0.5, cap=4.0), classify)
        except RetriesExhausted as exc:
            raise BackendError(f"cannot reach the {self.server_kind} at {self.url} "
                               f"({one_line(exc.failure.reason, 120)}); check --endpoint and that the server "
                               "is running") from None

    def _raise_for_auth(self, status: int | None, what: str) -> None:
        if status in (401, 403):
            which = "was refused" if self._token else "is required"
            raise BackendError(f"{what} at {self.url} -> HTTP {status}: the token {which}; set {self.token_env[0]} "
                               "(or .env) to a token this endpoint accepts")

    def _load_tokenizer(self):
        return models_module().load_tokenizer(self.model, revision=self.revision)

    async def _tokenize_probe(self) -> list[int] | None:
        """Ids the server gives "Hi" (with its special tokens), None when it cannot say."""
        return None

    async def _bos_to_strip(self) -> str | None:
        """The BOS text to strip from prompts when the server's tokenizer adds BOS itself."""
        tok = self._tokenizer
        bos, bos_id = getattr(tok, "bos_token", None), getattr(tok, "bos_token_id", None)
        if not bos or bos_id is None:
            return None
        adds = None
        try:
            ids = await self._tokenize_probe()
            if ids:
                adds = ids[0] == bos_id
        except Exception as exc:  # noqa: BLE001 - /tokenize is optional (older servers); fall back below
            self.log.debug("%s: POST /tokenize unavailable (%s); using the local tokenizer", self.name,
                           type(exc).__name__)
        if adds is None:
            ids = tok("Hi", add_special_tokens=True).input_ids
            adds = bool(ids) and ids[0] == bos_id and tok("Hi", add_special_tokens=False).input_ids[:1] != [bos_id]
        self.stats["server_adds_bos"] = int(adds)
        return bos if adds else None

    def _init_concurrency(self) -> None:
        limit = self._requested_concurrency or self.server.get("max_concurrent_requests") or self.default_concurrency
        self.max_concurrency = int(limit)
        self._sem = asyncio.Semaphore(self.max_concurrency)

    @property
    def _max_input(self) -> int | None:
        return self.server.get("max_input_tokens") or self.server.get("max_input_length")

    @property
    def _max_total(self) -> int | None:
        return self.server.get("max_total_tokens")

    # ------------------------------------------------------------------------------------ generation
    def _parameters(self, request: GenerationRequest, prompt: str) -> dict | GenerationResult:
        params = request.params
        max_new = int(params.max_new_tokens)
        # a token covers at least one byte (+ a few added tokens): short prompts need no counting
        bound = len(prompt.encode()) + 8
        if (self._max_input and bound > self._max_input) or (self._max_total and bound + max_new > self._max_total):
            n_in = len(self._tokenizer(prompt, add_special_tokens=True).input_ids)
            room = (self._max_total or n_in + max_new) - n_in
            if (self._max_input and n_in > self._max_input) or room < 1:
                return self._too_long(f"a prompt of {n_in} tokens does not fit the {self.server_kind} at {self.url} "
                                      f"(max_input_tokens={self._max_input}, max_total_tokens={self._max_total})")
            max_new = min(max_new, room)
        return self._request_kwargs(params, request.stop, max_new)

    def _too_long(self, message: str) -> GenerationResult:
        """A prompt the server cannot take: fatal before any success (every prompt would fail), else the
        conversation outgrew the server and ends as truncated."""
        if not self._succeeded:
            raise BackendError(f"{message}; give the server a larger context (TGI: --max-input-tokens/"
                               "--max-total-tokens) or use a shorter system prompt")
        self.stats["prompt_too_long"] += 1
        return GenerationResult("", "length", 0, error=message)

    def _stop_list(self, stop: tuple[str, ...]) -> list[str]:
        """The stop strings a request carries: as many as the server takes (the rest are cut here)."""
        return list(stop[: int(self.server.get("max_stop_sequences") or 4)])

    def _request_kwargs(self, params: SamplingParams, stop: tuple[str, ...], max_new: int) -> dict:
        raise NotImplementedError

    async def _send(self, prompt: str, kwargs: dict):
        raise NotImplementedError

    def _result(self, out, stops: tuple[str, ...]) -> GenerationResult:
        raise NotImplementedError

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """One request; the first permanent failure raises, and every other request of the run (in flight or
        new) then waits to be cancelled: no retries against a dead or refusing server, one error shown."""
        if self._sem is None:
            raise BackendError(f"the {self.name} backend was used before start(); use `async with backend:`")
        if self._fatal is None:
            try:
                return await self._generate(request)
            except BackendError as exc:
                if self._fatal is None:
                    self._fatal = exc
                    raise
        await asyncio.Event().wait()  # parked until the run, stopping on self._fatal, cancels this task
        raise self._fatal

    async def _generate(self, request: GenerationRequest) -> GenerationResult:
        prompt = request.prompt
        if self.strip_prefix and prompt.startswith(self.strip_prefix):
            prompt = prompt[len(self.strip_prefix):]
        kwargs = self._parameters(request, prompt)
        if isinstance(kwargs, GenerationResult):
            return kwargs

        async def send():
            async with self._sem:
                return await self._send(prompt, kwargs)

        def count(failure: Transient, attempt: int, delay: float | None) -> None:
            self.stats[f"retry:{failure.reason.split(':')[0]}"] += 1
            self._fail_fast(failure)

        if self._last_ok is None:
            self._last_ok = time.monotonic()

        policy = RetryPolicy(self.max_retries, base=self.backoff_base, cap=self.backoff_cap)
        try:
            out = await retry_async(send, policy, self._classify, count)
        except TooLong as too_long:
            return self._too_long(str(too_long))
        except RetriesExhausted as exhausted:
            last = exhausted.failure.reason
            self.stats["requests_failed"] += 1
            if last.startswith("connection refused"):
                raise BackendError(f"lost the {self.server_kind} at {self.url}: connection refused after "
                                   f"{self.max_retries} retries; restart it and re-run to resume") from None
            self.log.warning("%s: request failed after %d retries (%s); the conversation will be regenerated",
                             self.name, self.max_retries, last)
            return GenerationResult("", "error", 0, error=last)
        self._succeeded = True
        self._last_ok, self._fails_since_ok = time.monotonic(), 0
        self.stats["requests_ok"] += 1
        return self._result(out, request.stop)

    def _fail_fast(self, failure: Transient) -> None:
        """Every request over ``fail_fast_s`` failed (no success since): stop the run, exit 1; the rows
        finished so far stay in the checkpoint for a resume."""
        window = self.options.fail_fast_s
        self._fails_since_ok += 1      # (two at least: one slow request timing out is not a dead server)
        if window and self._last_ok is not None and self._fails_since_ok >= 2 and \
                time.monotonic() - self._last_ok >= window:
            raise RemoteUnavailableError(
                f"the {self.server_kind} at {self.url} failed every request for {window:g}s (last error: "
                f"{one_line(failure.reason, 160)}); the finished rows are kept: fix the server (or raise "
                "backend_options.fail_fast_s) and re-run the same command to resume")

    def _error_detail(self, exc: Exception, response) -> str:
        return one_line(exc.args[0] if exc.args else exc, 200)

    def _classify(self, exc: Exception) -> Transient:
        """Retryable failure -> Transient (reason, Retry-After); permanent failure -> raise BackendError."""
        import httpx2
        from huggingface_hub.errors import (
            GenerationError,
            IncompleteGenerationError,
            InferenceTimeoutError,
            OverloadedError,
            ValidationError,
        )

        response = http_response(exc)
        status = getattr(response, "status_code", None)
        detail = self._error_detail(exc, response)
        if isinstance(exc, (InferenceTimeoutError, httpx2.TimeoutException, asyncio.TimeoutError)):
            return Transient(f"timeout: no answer within {self.timeout:g}s")
        if isinstance(exc, httpx2.ConnectError):
            return Transient(f"connection refused: {detail}")
        if isinstance(exc, httpx2.TransportError):
            return Transient(f"connection error: {type(exc).__name__}")
        if isinstance(exc, (OverloadedError, GenerationError, IncompleteGenerationError)) or \
                status in RETRYABLE_STATUS:
            return Transient(f"HTTP {status or 'error'}: {detail}", retry_after(response))
        kind = self.server_kind
        self._raise_for_auth(status, "a generation request")
        if status == 404:
            raise BackendError(f"POST {self.url} -> HTTP 404: no generation route of a {kind} there; check --endpoint")
        if isinstance(exc, ValidationError) or status in (400, 422):
            if _TOO_LONG.search(detail):
                raise TooLong(f"the {kind} at {self.url} refused a prompt for its length: {detail}")
            raise BackendError(f"the {kind} at {self.url} rejected a request (HTTP {status or 422}): {detail}")
        if status is not None:
            raise BackendError(f"the {kind} at {self.url} answered HTTP {status}: {detail}")
        raise BackendError(f"{self.url} did not answer like a {kind} ({type(exc).__name__}: {detail}); check --endpoint")

    def _finish(self, text: str, finish: str, tokens: int, stops: tuple[str, ...], note: str) -> GenerationResult:
        text, stopped = cut_at_stop(text, stops)
        if stopped:  # a server may keep a matched stop sequence; stops beyond those it takes apply here
            finish = "stop"
        self.stats["generated_tokens"] += tokens
        return GenerationResult(text, finish, tokens, error=None if finish != "error" else note)

    def info(self) -> BackendInfo:
        extra = {"endpoint": self.url, "served_model_id": self.server.get("model_id"),
                 "served_model_sha": self.server.get("model_sha"), "server_version": self.server.get("version"),
                 "max_input_tokens": self._max_input, "max_total_tokens": self._max_total,
                 "max_concurrent_requests": self.server.get("max_concurrent_requests"),
                 "strip_bos": self.strip_prefix is not None, "stats": dict(self.stats)}
        return BackendInfo(name=self.name, model_id=self.model, model_revision=self.revision,
                           max_concurrency=self.max_concurrency, extra=extra)
