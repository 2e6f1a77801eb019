"""Backend ``openai``: raw MAGPIE prompts sent to an OpenAI-compatible ``/v1/completions`` server.

vLLM, SGLang and llama.cpp's server offer the legacy *text completion* route, which is what MAGPIE needs:
the prompt is a chat-template prefix rendered locally (e.g. Llama-3's pre-query template) and the model
continues it. Chat-only APIs (``/v1/chat/completions`` alone, as OpenAI's chat models) apply the chat
template themselves and answer as the assistant, so they cannot write the user's query: ``start()``
probes the route and refuses such a server with an explanation.

Recipe: ``backend: openai`` and ``backend_options: {endpoint: http://host:8000, served_model: NAME}``
(or ``--backend openai --endpoint URL``, or ``MAGPIE_OPENAI_ENDPOINT``). The key comes from
``api_key``, ``OPENAI_API_KEY`` or ``.env`` (never ``HF_TOKEN``: an arbitrary server gets no Hub token).
``start()`` reads ``GET /v1/models``: the recipe's model must be one of the served ids (or name it with
``served_model``; ``check_model: false`` skips the check); ``max_model_len`` (vLLM) bounds the prompts.
BOS: the server tokenizes the prompt with special tokens added (vLLM's default), so the leading BOS text is
stripped when the server's ``/tokenize`` (or, without it, the local tokenizer) shows that it adds BOS.
Retries, backoff, fail-fast errors and the prompt-fit rules are those of
:mod:`magpie_hub.generate.backends.http.base`.

Several replicas: ``endpoints: [url, ...]`` (:mod:`magpie_hub.generate.backends.http.pool`): each is probed
with ``GET /v1/models`` (the same model ids everywhere) and taken out / re-probed / rejoined on failure.
vLLM does not report its concurrency limit: each endpoint takes ``max_concurrency`` (default 64) at once.
"""

from __future__ import annotations

from magpie_hub.errors import BackendError
from magpie_hub.generate.backends.base import GenerationResult
from magpie_hub.generate.backends.http.base import models_module, one_line, public_url, sampling_fields
from magpie_hub.generate.backends.http.pool import PooledBackend, PoolOptions, Unreachable

CHAT_ONLY = ("offers no raw text completion (POST /v1/completions -> {status}: {detail}); MAGPIE needs raw "
             "completion of a chat-template prefix, which a chat-only API cannot do (it applies the chat template "
             "itself and answers as the assistant); serve the model with vLLM, SGLang or llama.cpp's server "
             "(they offer /v1/completions) or with TGI (backend: tgi)")


class OpenAIOptions(PoolOptions):
    served_model: str | None = None          # the id in GET /v1/models, when it is not the recipe's model
    api_key: str | None = None               # else OPENAI_API_KEY (environment or .env); never HF_TOKEN


class OpenAICompletionsBackend(PooledBackend):
    """An OpenAI-compatible text-completion server (vLLM, SGLang, llama.cpp) as the generation backend."""

    name = "openai"
    Options = OpenAIOptions
    unsupported_sampling = frozenset({"no_repeat_ngram_size"})     # not in vLLM's / llama.cpp's request body
    server_kind = "OpenAI-compatible server"
    env_var = "MAGPIE_OPENAI_ENDPOINT"
    token_option = "api_key"
    token_env = ("OPENAI_API_KEY",)
    default_concurrency = 64

    def __init__(self, model: str, *, revision: str | None = None, **options):
        super().__init__(model, revision=revision, **options)
        self.served_model = self.options.served_model
        self._http = None

    def _normalise_endpoint(self, endpoint: str | None) -> str | None:
        if endpoint and endpoint.rstrip("/").endswith("/v1"):
            return endpoint.rstrip("/")[: -len("/v1")]
        return endpoint

    async def start(self) -> None:
        await self._start_pool()
        self._http = await self._open_client(self.endpoint, 256)
        models = await self._models()
        self._choose_model(models)
        self._tokenizer = self._load_tokenizer()
        await self._probe_completions()
        self.strip_prefix = await self._bos_to_strip()
        self._init_concurrency()

    async def _open_client(self, base: str, limit: int):
        import httpx2

        return httpx2.AsyncClient(base_url=base, headers=self._headers(), timeout=self.timeout, follow_redirects=True,
                                  limits=httpx2.Limits(max_connections=None, max_keepalive_connections=max(limit, 256)))

    async def _probe_endpoint(self, base: str) -> dict:
        """One read of ``GET /v1/models`` (a pool member): its model ids, Unreachable when it is down."""
        import httpx2

        async with httpx2.AsyncClient(base_url=base, headers=self._headers(), timeout=min(self.timeout, 10.0),
                                      follow_redirects=True) as http:
            try:
                resp = await http.get("/v1/models")
            except httpx2.TransportError as exc:
                raise Unreachable(f"{type(exc).__name__}: {one_line(exc, 80)}") from None
        if resp.status_code in (502, 503, 504):
            raise Unreachable(f"GET /v1/models -> {resp.status_code}")
        data = self._model_list(resp, public_url(base),
                                "every endpoint of an openai pool must be an OpenAI-compatible server")
        ids = sorted(str(m["id"]) for m in data)
        return {"model_id": ", ".join(ids), "ids": ids}

    @staticmethod
    def _served_identity(info: dict) -> tuple:
        return (info.get("model_id"),)

    def _tokens_of(self, out) -> int:
        try:
            return int((out.get("usage") or {}).get("completion_tokens") or 0)
        except AttributeError:
            return 0

    async def close(self) -> None:
        await self._close_pool()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _models(self) -> list[dict]:
        resp = await self._get_ready(self._http, "/v1/models")
        return self._model_list(resp, self.url,
                                "give the base URL of an OpenAI-compatible server (vLLM, SGLang, llama.cpp)")

    def _model_list(self, resp, url: str, fix: str) -> list[dict]:
        """The ``data`` entries (with an ``id``) of a ``GET /v1/models`` answer; one line naming ``fix`` if none."""
        self._raise_for_auth(resp.status_code, "GET /v1/models")
        try:
            data = resp.json().get("data") if resp.status_code == 200 else None
        except (ValueError, AttributeError):
            data = None
        models = [m for m in data if isinstance(m, dict) and m.get("id")] if isinstance(data, list) else []
        if not models:
            raise BackendError(f"GET {url}/v1/models -> HTTP {resp.status_code} without a model list; {fix}")
        return models

    def _choose_model(self, models: list[dict]) -> None:
        ids = [m["id"] for m in models]
        ours = models_module().resolve_model(self.model)
        wanted = self.served_model or next((i for i in ids if i in (self.model, ours)), None)
        if wanted is None and not self.check_model and len(ids) == 1:
            wanted = ids[0]
        if wanted not in ids:
            raise BackendError(f"model mismatch: the {self.server_kind} at {self.url} serves {', '.join(ids)} but the "
                               f"recipe names {self.served_model or self.model!r}; set backend_options.served_model "
                               "(and check_model: false if the tokenizer differs in name only)")
        if self.check_model and self.served_model and self.served_model not in (self.model, ours):
            raise BackendError(f"model mismatch: served_model {self.served_model!r} is not the recipe's model "
                               f"{self.model!r}; set backend_options.check_model: false if they are the same model")
        self.served_model = wanted
        entry = next(m for m in models if m["id"] == wanted)
        self.server = {"model_id": wanted, "max_total_tokens": entry.get("max_model_len"),
                       "max_stop_sequences": 4, "owned_by": entry.get("owned_by")}

    async def _probe_completions(self) -> None:
        import httpx2

        try:
            resp = await self._http.post("/v1/completions", json={"model": self.served_model, "prompt": "Hi",
                                                                  "max_tokens": 1})
        except httpx2.TransportError as exc:
            raise BackendError(f"cannot reach {self.url}/v1/completions ({type(exc).__name__})") from None
        self._raise_for_auth(resp.status_code, "POST /v1/completions")
        detail = self._body_message(resp)
        if resp.status_code in (404, 405, 501) or (resp.status_code >= 400 and "chat" in detail.lower()):
            raise BackendError(f"the {self.server_kind} at {self.url} " +
                               CHAT_ONLY.format(status=resp.status_code, detail=one_line(detail, 100)))

    async def _tokenize_probe(self) -> list[int] | None:
        resp = await self._http.post("/tokenize", json={"model": self.served_model, "prompt": "Hi"})
        if resp.status_code != 200:
            return None
        data = resp.json()
        if isinstance(data, dict) and isinstance(data.get("tokens"), list):  # vLLM / SGLang / llama.cpp
            return [t if isinstance(t, int) else t.get("id") for t in data["tokens"]]
        if isinstance(data, list):                                          # TGI's shape
            return [t.get("id") for t in data if isinstance(t, dict)]
        return None

    @staticmethod
    def _body_message(resp) -> str:
        try:
            body = resp.json()
        except ValueError:
            return resp.text[:200]
        err = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)

    def _request_kwargs(self, params, stop: tuple[str, ...], max_new: int) -> dict:
        body = {"model": self.served_model, "max_tokens": max_new, "n": 1, "stream": False}
        if stop:
            body["stop"] = self._stop_list(stop)
        body.update({"temperature": 0.0} if params.greedy else sampling_fields(params, seed_bits=63))
        if params.repetition_penalty is not None:
            if self.server.get("owned_by") == "llamacpp":   # llama.cpp's name; -1: over the whole context
                body.update(repeat_penalty=float(params.repetition_penalty), repeat_last_n=-1)
            else:                                           # vLLM, SGLang (prompt + output, as transformers)
                body["repetition_penalty"] = float(params.repetition_penalty)
        return body

    async def _send(self, prompt: str, kwargs: dict):
        if self.pool is not None:
            return await self._pooled(lambda http: self._post(http, prompt, kwargs))
        return await self._post(self._http, prompt, kwargs)

    @staticmethod
    async def _post(http, prompt: str, kwargs: dict):
        resp = await http.post("/v1/completions", json={**kwargs, "prompt": prompt})
        if resp.status_code >= 400:
            resp.raise_for_status()
        return resp.json()

    def _error_detail(self, exc: Exception, response) -> str:
        if response is not None:
            return one_line(self._body_message(response), 200)
        return super()._error_detail(exc, response)

    def _result(self, out, stops: tuple[str, ...]) -> GenerationResult:
        try:
            choice = out["choices"][0]
            text, reason = choice.get("text") or "", choice.get("finish_reason")
            tokens = int((out.get("usage") or {}).get("completion_tokens") or 0)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise BackendError(f"{self.url}/v1/completions did not answer in the OpenAI format; check --endpoint") \
                from None
        finish = {"stop": "stop", "eos": "stop", "length": "length"}.get(str(reason), "error")
        return self._finish(text, finish, tokens, stops, f"finish_reason {reason}")
