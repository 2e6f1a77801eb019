"""Backend ``tgi``: raw MAGPIE prompts sent to a text-generation-inference server.

Recipe: ``backend: tgi`` and ``backend_options: {endpoint: http://host:8080}`` (or ``--backend tgi
--endpoint URL``, or ``MAGPIE_TGI_ENDPOINT``). The token comes from ``token``, ``HF_TOKEN`` or ``.env``
and is sent only as the Authorization header (never logged). Requests go through huggingface_hub's
``AsyncInferenceClient.text_generation(details=True)``; every conversation task of the engine awaits its
own request, so a conversation's next turn starts as soon as its previous one returns (no lockstep).

``start()`` reads ``GET /health`` and ``GET /info``: the served ``model_id`` must match the recipe's
model (``check_model: false`` skips this, e.g. for a local tokenizer copy), the concurrency limit
defaults to the server's ``max_concurrent_requests``, and ``max_input_tokens``/``max_total_tokens``
bound every prompt (counted with the local tokenizer, as the server counts: special tokens added).

BOS: the engine renders prompts from the model's own chat template, so a Llama-3 prompt starts with
``<|begin_of_text|>``; TGI always tokenizes with special tokens added, which would give BOS twice. The
backend asks the server's ``POST /tokenize`` whether it adds BOS (falling back to the local tokenizer's
behaviour when that route is absent) and then strips the leading BOS text from every prompt. These startup
checks live in :mod:`magpie_hub.generate.backends.http.server_info`; this module holds requests, retries and results.

Failures: 429/5xx/424, timeouts and connection resets are retried with exponential backoff and jitter
(``max_retries``); a request that still fails returns ``finish_reason="error"`` (the engine regenerates the
conversation). 400/401/403/404 and 422 validation errors raise :class:`BackendError` at once (one line:
bad endpoint, bad token, model mismatch), which stops the whole run. A prompt longer than the server
allows ends that conversation (``"length"``), or the run when no request has succeeded yet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections import Counter
from urllib.parse import urlsplit

from magpie_hub.errors import BackendError, RecipeError
from magpie_hub.generate.backends.base import Backend, BackendInfo, GenerationRequest, GenerationResult
from magpie_hub.generate.backends.http.server_info import (  # noqa: F401 - re-exported for openai_completions
    TGIServerInfo,
    _one_line,
    public_url,
    secret_from_env,
)
from magpie_hub.retry import RETRYABLE_STATUS, backoff_delay, parse_retry_after

log = logging.getLogger(__name__)

FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
_TOO_LONG = re.compile(r"must have less than \d+ tokens|must be <= \d+\. Given: \d+ `inputs` tokens|"
                       r"maximum context length|exceeds the context size|context length", re.IGNORECASE)


class _TooLong(Exception):
    """The server refused a prompt for its length (its own count is the authority)."""


def _status_of(exc: BaseException) -> tuple[int | None, object]:
    """HTTP status and response of a huggingface_hub error (TGI errors keep it on ``__cause__``)."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if response is not None and getattr(response, "status_code", None) is not None:
            return response.status_code, response
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None, None


class TGIBackend(TGIServerInfo, Backend):
    """A TGI server as the generation backend: bounded concurrency, retries, validation of the server."""

    name = "tgi"
    server_kind = "TGI server"
    env_var = "MAGPIE_TGI_ENDPOINT"
    default_concurrency = 128

    def __init__(self, model: str, *, revision: str | None = None, endpoint: str | None = None,
                 max_concurrency: int | None = None, timeout: float = 120, max_retries: int = 8,
                 token: str | None = None, check_model: bool = True, backoff_base: float = 0.5,
                 backoff_cap: float = 30.0, **options):
        if options:
            log.warning("%s backend ignores unknown backend_options: %s", self.name, ", ".join(sorted(options)))
        endpoint = endpoint or os.environ.get(self.env_var)
        if not endpoint:
            raise RecipeError(f"the {self.name} backend needs a server URL: set backend_options.endpoint in the "
                              f"recipe, pass --endpoint URL or set {self.env_var}")
        if urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).hostname:
            raise RecipeError(f"{self.name} endpoint {public_url(endpoint)!r} is not an http(s):// URL "
                              "(give the server's base URL, e.g. http://127.0.0.1:8080)")
        for key, value, low in (("timeout", timeout, 0.001), ("max_retries", max_retries, 0),
                                ("max_concurrency", max_concurrency, 1), ("backoff_base", backoff_base, 0),
                                ("backoff_cap", backoff_cap, 0)):
            if value is not None and (not isinstance(value, (int, float)) or value < low):
                raise RecipeError(f"backend_options.{key} must be a number >= {low} (got {value!r})")
        self.model, self.revision = model, revision
        self.endpoint = endpoint.rstrip("/")
        self.url = public_url(self.endpoint)
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff_base, self.backoff_cap = float(backoff_base), float(backoff_cap)
        self.check_model = bool(check_model)
        self._token = token or secret_from_env("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
        self._requested_concurrency = max_concurrency
        self.server: dict = {}
        self.strip_prefix: str | None = None
        self.max_concurrency: int | None = None
        self.stats: Counter = Counter()
        self._client = None
        self._tokenizer = None
        self._sem: asyncio.Semaphore | None = None
        self._succeeded = False
        self._fatal: BackendError | None = None

    # ------------------------------------------------------------------------------------ startup
    async def start(self) -> None:
        from huggingface_hub import AsyncInferenceClient, constants

        if constants.is_offline_mode():
            raise BackendError(f"HF_HUB_OFFLINE=1 makes huggingface_hub refuse every HTTP call, even to {self.url}; "
                               "unset HF_HUB_OFFLINE to use the tgi backend")
        self.server = await self._read_info()
        self._check_model(self.server.get("model_id"))
        self._tokenizer = self._load_tokenizer()
        self.strip_prefix = await self._bos_to_strip()
        self._init_concurrency()
        self._client = AsyncInferenceClient(base_url=self.endpoint, token=self._token, timeout=self.timeout)
        await self._install_session(self.max_concurrency)
        log.info("tgi: %s serves %s (max_concurrent_requests=%s, max_input_tokens=%s, max_total_tokens=%s); "
                 "%d requests in flight, strip BOS %r", self.url, self.server.get("model_id"),
                 self.server.get("max_concurrent_requests"), self._max_input, self._max_total,
                 self.max_concurrency, self.strip_prefix)

    def _init_concurrency(self) -> None:
        limit = self._requested_concurrency or self.server.get("max_concurrent_requests") or self.default_concurrency
        self.max_concurrency = int(limit)
        self._sem = asyncio.Semaphore(self.max_concurrency)

    async def _install_session(self, limit: int) -> None:
        """Give the client a connection pool as large as the concurrency (httpx keeps only 20 alive by
        default: every extra request would open a new connection). Same hooks as huggingface_hub's own."""
        try:
            import httpx2
            from huggingface_hub.utils._http import async_hf_request_event_hook, async_hf_response_event_hook
        except ImportError:  # pragma: no cover - other huggingface_hub layouts: keep its default session
            return
        if getattr(self._client, "_async_client", "missing") is not None:
            return
        session = httpx2.AsyncClient(
            event_hooks={"request": [async_hf_request_event_hook], "response": [async_hf_response_event_hook]},
            follow_redirects=True, timeout=None,
            limits=httpx2.Limits(max_connections=limit + 8, max_keepalive_connections=limit + 8))
        self._client._async_client = await self._client.exit_stack.enter_async_context(session)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

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

    def _request_kwargs(self, params, stop: tuple[str, ...], max_new: int) -> dict:
        kwargs: dict = {"details": True, "max_new_tokens": max_new, "return_full_text": False}
        max_stop = int(self.server.get("max_stop_sequences") or 4)
        if stop:
            kwargs["stop"] = list(stop[:max_stop])
        if params.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=float(params.temperature))
            if 0.0 < params.top_p < 1.0:
                kwargs["top_p"] = float(params.top_p)
            if params.seed is not None:
                kwargs["seed"] = int(params.seed) % (2**64)
        return kwargs

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
        last = "unknown error"
        for attempt in range(self.max_retries + 1):
            async with self._sem:
                try:
                    out = await self._send(prompt, kwargs)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - classified below: fatal -> raise, else retry
                    try:
                        last, wait = self._classify(exc)
                    except _TooLong as too_long:
                        return self._too_long(str(too_long))
                else:
                    self._succeeded = True
                    self.stats["requests_ok"] += 1
                    return self._result(out, request.stop)
            self.stats[f"retry:{last.split(':')[0]}"] += 1
            if attempt < self.max_retries:
                await asyncio.sleep(backoff_delay(attempt, base=self.backoff_base, cap=self.backoff_cap,
                                                  retry_after=wait))
        self.stats["requests_failed"] += 1
        if last.startswith("connection refused"):
            raise BackendError(f"lost the {self.server_kind} at {self.url}: connection refused after "
                               f"{self.max_retries} retries; restart it and re-run to resume")
        log.warning("%s: request failed after %d retries (%s); the conversation will be regenerated",
                    self.name, self.max_retries, last)
        return GenerationResult("", "error", 0, error=last)

    async def _send(self, prompt: str, kwargs: dict):
        return await self._client.text_generation(prompt, **kwargs)

    def _error_detail(self, exc: Exception, response) -> str:
        return _one_line(exc.args[0] if exc.args else exc, 200)

    def _classify(self, exc: Exception) -> tuple[str, float | None]:
        """Retryable failure -> (reason, Retry-After seconds); permanent failure -> raise BackendError."""
        import httpx2
        from huggingface_hub.errors import (
            GenerationError,
            IncompleteGenerationError,
            InferenceTimeoutError,
            OverloadedError,
            ValidationError,
        )

        status, response = _status_of(exc)
        detail = self._error_detail(exc, response)
        if isinstance(exc, (InferenceTimeoutError, httpx2.TimeoutException, asyncio.TimeoutError)):
            return f"timeout: no answer within {self.timeout:g}s", None
        if isinstance(exc, httpx2.ConnectError):
            return f"connection refused: {detail}", None
        if isinstance(exc, httpx2.TransportError):
            return f"connection error: {type(exc).__name__}", None
        if isinstance(exc, (OverloadedError, GenerationError, IncompleteGenerationError)) or \
                status in RETRYABLE_STATUS:
            headers = getattr(response, "headers", None) or {}
            return f"HTTP {status or 'error'}: {detail}", parse_retry_after(headers.get("Retry-After"))
        kind = self.server_kind
        if status in (401, 403):
            self._raise_for_auth(status, "a generation request", "HF_TOKEN" if self.name == "tgi" else "OPENAI_API_KEY")
        if status == 404:
            raise BackendError(f"POST {self.url} -> HTTP 404: no generation route of a {kind} there; check --endpoint")
        if isinstance(exc, ValidationError) or status in (400, 422):
            if _TOO_LONG.search(detail):
                raise _TooLong(f"the {kind} at {self.url} refused a prompt for its length: {detail}")
            raise BackendError(f"the {kind} at {self.url} rejected a request (HTTP {status or 422}): {detail}")
        if status is not None:
            raise BackendError(f"the {kind} at {self.url} answered HTTP {status}: {detail}")
        raise BackendError(f"{self.url} did not answer like a {kind} ({type(exc).__name__}: {detail}); check --endpoint")

    def _result(self, out, stops: tuple[str, ...]) -> GenerationResult:
        details = getattr(out, "details", None)
        if details is None:
            raise BackendError(f"{self.url} answered without `details`; it is not a TGI text-generation route")
        finish = FINISH.get(str(details.finish_reason), "error")
        return self._finish(out.generated_text or "", finish, int(details.generated_tokens or 0), stops,
                            f"finish_reason {details.finish_reason}")

    def _finish(self, text: str, finish: str, tokens: int, stops: tuple[str, ...], note: str) -> GenerationResult:
        cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
        if cut >= 0:  # TGI keeps a matched stop sequence in generated_text; stops beyond the 4 sent apply here
            text, finish = text[:cut], "stop"
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
