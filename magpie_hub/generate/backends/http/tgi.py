"""Backend ``tgi``: raw MAGPIE prompts sent to a text-generation-inference server.

Recipe: ``backend: tgi`` and ``backend_options: {endpoint: http://host:8080}`` (or ``--backend tgi
--endpoint URL``, or ``MAGPIE_TGI_ENDPOINT``). The token comes from ``token``, ``HF_TOKEN`` or ``.env``
and is sent only as the Authorization header (never logged). Requests go through huggingface_hub's
``AsyncInferenceClient.text_generation(details=True)``; every conversation task of the engine awaits its
own request, so a conversation's next turn starts as soon as its previous one returns (no lockstep).

``start()`` reads ``GET /health`` and ``GET /info``: the served ``model_id`` must match the recipe's
model (``check_model: false`` skips this, e.g. for a local tokenizer copy), a pinned revision must match
its ``model_sha``, the concurrency limit defaults to the server's ``max_concurrent_requests``, and
``max_input_tokens``/``max_total_tokens`` bound every prompt. TGI always tokenizes with special tokens
added: its ``POST /tokenize`` tells whether the leading BOS text must be stripped. Retries, fail-fast
errors and the prompt-fit rules are those of :mod:`magpie_hub.generate.backends.http.base`.

Several TGI replicas: ``endpoints: [url, ...]`` (:mod:`magpie_hub.generate.backends.http.pool`): each is
probed with ``/health`` + ``/info`` (same ``model_id`` / ``model_sha`` everywhere), weighted by its own
``max_concurrent_requests``, and taken out / re-probed / rejoined on failure.
"""

from __future__ import annotations

import re
from pathlib import Path

from magpie_hub.errors import BackendError
from magpie_hub.generate.backends.base import GenerationResult
from magpie_hub.generate.backends.http.base import models_module, one_line, public_url, sampling_fields
from magpie_hub.generate.backends.http.pool import PooledBackend, PoolOptions, Unreachable

FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def cut_at_special_stop(text: str, tokens, stops: tuple[str, ...]) -> tuple[str, bool]:
    """TGI's ``generated_text`` skips special tokens, so a role header the server did not stop on (a stop
    beyond its ``max_stop_sequences``) would leave its text in the turn: find the first special token of
    ``details.tokens`` that is one of ``stops`` and cut the text before it (docs/fidelity.md)."""
    before: list[str] = []
    for token in tokens or ():
        special = bool(getattr(token, "special", False))
        if special and getattr(token, "text", None) in stops:
            prefix = "".join(before)
            return (text[:len(prefix)] if text.startswith(prefix) else prefix), True
        if not special:
            before.append(getattr(token, "text", "") or "")
    return text, False


def same_model(recipe_ref: str, served: str, resolve) -> bool:
    """Does a server serving ``served`` serve the recipe's model? The same reference (``tiny:llama3``, an
    alias, a Hub id; any case), the same resolved folder or Hub id (``resolve`` = the models resolver), or,
    when one side is a local folder, the same folder name (TGI started on ``/data/Llama-3-8B`` for a recipe
    naming ``meta-llama/Llama-3-8B``)."""
    def variants(ref: str) -> set[str]:
        out = {ref}
        try:
            out.add(str(resolve(ref)))
        except Exception:  # noqa: BLE001 - an unresolvable name is compared as written
            pass
        out |= {str(Path(v).expanduser().resolve()) for v in list(out) if Path(v).expanduser().is_dir()}
        return {v.rstrip("/").lower() for v in out}

    ours, theirs = variants(recipe_ref), variants(served)
    if ours & theirs:
        return True
    local = any(Path(v).expanduser().is_dir() or v.startswith(("/", "./", "~")) for v in (recipe_ref, served))
    return local and bool({Path(v).name for v in ours} & {Path(v).name for v in theirs})


class TGIOptions(PoolOptions):
    token: str | None = None                 # else HF_TOKEN (environment or .env)


class TGIBackend(PooledBackend):
    """A TGI server as the generation backend: bounded concurrency, retries, validation of the server."""

    name = "tgi"
    Options = TGIOptions
    unsupported_sampling = frozenset({"no_repeat_ngram_size"})     # TGI's API has no such parameter
    server_kind = "TGI server"
    env_var = "MAGPIE_TGI_ENDPOINT"
    token_option = "token"
    token_env = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    default_concurrency = 128

    def __init__(self, model: str, *, revision: str | None = None, **options):
        super().__init__(model, revision=revision, **options)
        self._client = None

    # ------------------------------------------------------------------------------------ startup
    async def start(self) -> None:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise BackendError(f"HF_HUB_OFFLINE=1 makes huggingface_hub refuse every HTTP call, even to {self.url}; "
                               "unset HF_HUB_OFFLINE to use the tgi backend")
        await self._start_pool()
        self.server = await self._read_info()
        self._check_model(self.server.get("model_id"))
        self._tokenizer = self._load_tokenizer()
        self.strip_prefix = await self._bos_to_strip()
        self._init_concurrency()
        if self.pool is None:
            self._client = await self._open_client(self.endpoint, self.max_concurrency)
        self.log.info("tgi: %s serves %s (max_concurrent_requests=%s, max_input_tokens=%s, max_total_tokens=%s); "
                      "%d requests in flight, strip BOS %r", self.url, self.server.get("model_id"),
                      self.server.get("max_concurrent_requests"), self._max_input, self._max_total,
                      self.max_concurrency, self.strip_prefix)

    async def _open_client(self, base: str, limit: int):
        from huggingface_hub import AsyncInferenceClient

        client = AsyncInferenceClient(base_url=base, token=self._token, timeout=self.timeout)
        await self._install_session(client, limit)
        return client

    async def _close_client(self, client) -> None:
        await client.close()

    async def _install_session(self, client, limit: int) -> None:
        """Give the client a connection pool as large as the concurrency (httpx keeps only 20 alive by
        default: every extra request would open a new connection). Same hooks as huggingface_hub's own."""
        try:
            import httpx2
            from huggingface_hub.utils._http import async_hf_request_event_hook, async_hf_response_event_hook
        except ImportError:  # pragma: no cover - other huggingface_hub layouts: keep its default session
            return
        if getattr(client, "_async_client", "missing") is not None:
            return
        session = httpx2.AsyncClient(
            event_hooks={"request": [async_hf_request_event_hook], "response": [async_hf_response_event_hook]},
            follow_redirects=True, timeout=None,
            limits=httpx2.Limits(max_connections=limit + 8, max_keepalive_connections=limit + 8))
        client._async_client = await client.exit_stack.enter_async_context(session)

    async def close(self) -> None:
        await self._close_pool()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _read_info(self) -> dict:
        import httpx2

        async with httpx2.AsyncClient(base_url=self.endpoint, headers=self._headers(),
                                      timeout=min(self.timeout, 30.0), follow_redirects=True) as http:
            health = await self._get_ready(http, "/health")
            self._raise_for_auth(health.status_code, "GET /health")
            try:
                info = await http.get("/info")
            except httpx2.TransportError as exc:
                raise BackendError(f"cannot read {self.url}/info ({type(exc).__name__}); check --endpoint") from None
            self._raise_for_auth(info.status_code, "GET /info")
            if info.status_code == 404:
                raise BackendError(f"{self.url} has no GET /info, so it is not a TGI server; give the TGI base URL "
                                   "(an OpenAI-compatible server needs backend: openai)")
            try:
                data = info.json() if info.status_code == 200 else None
            except ValueError:
                data = None
            if not isinstance(data, dict) or "model_id" not in data:
                raise BackendError(f"GET {self.url}/info -> HTTP {info.status_code} without TGI's model_id; "
                                   "check that --endpoint points to a text-generation-inference server")
            return data

    async def _probe_endpoint(self, base: str) -> dict:
        """One read of ``/health`` + ``/info`` (a pool member): its info, Unreachable when it is down."""
        import httpx2

        async with httpx2.AsyncClient(base_url=base, headers=self._headers(), timeout=min(self.timeout, 10.0),
                                      follow_redirects=True) as http:
            try:
                health = await http.get("/health")
                info = await http.get("/info") if health.status_code == 200 else None
            except httpx2.TransportError as exc:
                raise Unreachable(f"{type(exc).__name__}: {one_line(exc, 80)}") from None
        if health.status_code in (502, 503, 504):
            raise Unreachable(f"GET /health -> {health.status_code}")
        self._raise_for_auth(health.status_code, "GET /health")
        data = info.json() if info is not None and info.status_code == 200 else None
        if not isinstance(data, dict) or "model_id" not in data:
            raise BackendError(f"{public_url(base)} has no TGI GET /info (HTTP {getattr(info, 'status_code', None) or health.status_code}); "
                               "every endpoint of a tgi pool must be a TGI server")
        return data

    @staticmethod
    def _served_identity(info: dict) -> tuple:
        return (info.get("model_id"), info.get("model_sha"))

    def _tokens_of(self, out) -> int:
        details = getattr(out, "details", None)
        return int(getattr(details, "generated_tokens", 0) or 0)

    def _check_model(self, served: str | None) -> None:
        if not self.check_model or not served:
            return
        if not same_model(self.model, served, models_module().resolve_model):
            raise BackendError(f"model mismatch: the TGI server at {self.url} serves {served!r} but the recipe names "
                               f"{self.model!r}; point the recipe at the served model, or set backend_options."
                               "check_model: false if it is the same model under another name")
        sha, rev = self.server.get("model_sha"), self.revision
        if sha and rev and re.fullmatch(r"[0-9a-f]{40}", rev) and sha != rev:
            raise BackendError(f"revision mismatch: the TGI server serves {served}@{sha[:12]} but the recipe pins "
                               f"revision {rev[:12]}; align them or set check_model: false")

    async def _tokenize_probe(self) -> list[int] | None:
        import httpx2

        async with httpx2.AsyncClient(base_url=self.endpoint, headers=self._headers(),
                                      timeout=min(self.timeout, 30.0)) as h:
            resp = await h.post("/tokenize", json={"inputs": "Hi"})
            data = resp.json() if resp.status_code == 200 else None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return [t.get("id") for t in data]
        return None

    # ------------------------------------------------------------------------------------ generation
    def _request_kwargs(self, params, stop: tuple[str, ...], max_new: int) -> dict:
        kwargs: dict = {"details": True, "max_new_tokens": max_new, "return_full_text": False}
        if stop:
            kwargs["stop"] = self._stop_list(stop)
        if params.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, **sampling_fields(params, seed_bits=64))
        if params.repetition_penalty is not None:
            kwargs["repetition_penalty"] = float(params.repetition_penalty)
        return kwargs

    async def _send(self, prompt: str, kwargs: dict):
        if self.pool is not None:
            return await self._pooled(lambda client: client.text_generation(prompt, **kwargs))
        return await self._client.text_generation(prompt, **kwargs)

    def _result(self, out, stops: tuple[str, ...]) -> GenerationResult:
        details = getattr(out, "details", None)
        if details is None:
            raise BackendError(f"{self.url} answered without `details`; it is not a TGI text-generation route")
        finish = FINISH.get(str(details.finish_reason), "error")
        text, marker = cut_at_special_stop(out.generated_text or "", getattr(details, "tokens", None), stops)
        return self._finish(text, "stop" if marker else finish, int(details.generated_tokens or 0), stops,
                            f"finish_reason {details.finish_reason}")
