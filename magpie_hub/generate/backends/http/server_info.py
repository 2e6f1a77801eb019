"""Server introspection for the ``tgi`` (and ``openai``) backends: what is served, and how to talk to it.

Shared helpers (token lookup, URL redaction, one-line messages, ``tiny:*`` model aliases) and
:class:`TGIServerInfo`, the startup checks mixed into :class:`~magpie_hub.generate.backends.http.tgi.TGIBackend`:
readiness (``GET /health``, with a few seconds for a server still starting), ``GET /info`` (the served
``model_id`` must match the recipe's model, and a pinned revision its ``model_sha``), the prompt limits
``max_input_tokens``/``max_total_tokens``, auth failures as one-line errors, and the BOS probe (``POST
/tokenize``, else the local tokenizer) that decides whether the leading BOS text is stripped from prompts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from magpie_hub.errors import BackendError, redact
from magpie_hub.models import load_tokenizer, resolve_model
from magpie_hub.retry import backoff_delay

log = logging.getLogger("magpie_hub.generate.backends.http.tgi")  # the backend's own logger, as before the split


def secret_from_env(*names: str) -> str | None:
    """The first of ``names`` set in the environment, else in ``./.env`` (never logged)."""
    found = next((os.environ[n] for n in names if os.environ.get(n)), None)
    if not found and Path(".env").is_file():
        from dotenv import dotenv_values

        values = dotenv_values(".env")
        found = next((values[n] for n in names if values.get(n)), None)
    return found or None


def public_url(url: str) -> str:
    """``url`` without credentials or query string, safe for logs, manifests and messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _one_line(text: object, limit: int = 240) -> str:
    text = " ".join(redact(str(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TGIServerInfo:
    """Startup introspection of a TGI server, mixed into TGIBackend (whose ``__init__`` sets ``endpoint``,
    ``url``, ``model``, ``revision``, ``check_model``, ``timeout``, ``server``, ``stats`` and the token)."""

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def _get_ready(self, http, route: str):
        """GET ``route``; a server that is still starting (503, connection refused) gets a few seconds."""
        import httpx2

        for attempt in range(4):
            try:
                resp = await http.get(route)
                if resp.status_code != 503:
                    return resp
                reason = f"GET {route} -> 503 (server not ready)"
            except httpx2.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt == 3:
                raise BackendError(f"cannot reach the {self.server_kind} at {self.url} ({_one_line(reason, 120)}); "
                                   "check --endpoint and that the server is running")
            await asyncio.sleep(backoff_delay(attempt, base=0.5, cap=4.0))

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

    def _raise_for_auth(self, status: int, what: str, key_name: str = "HF_TOKEN") -> None:
        if status in (401, 403):
            which = "was refused" if self._token else "is required"
            raise BackendError(f"{what} at {self.url} -> HTTP {status}: the token {which}; set {key_name} (or .env) "
                               "to a token this endpoint accepts")

    def _check_model(self, served: str | None) -> None:
        if not self.check_model or not served:
            return
        ours = resolve_model(self.model)
        same = served == ours or served.lower() == ours.lower()
        if not same and Path(served).is_dir() and Path(ours).is_dir():
            same = Path(served).resolve() == Path(ours).resolve()
        if not same:
            raise BackendError(f"model mismatch: the TGI server at {self.url} serves {served!r} but the recipe names "
                               f"{self.model!r}; point the recipe at the served model, or set backend_options."
                               "check_model: false if it is the same model under another name")
        sha, rev = self.server.get("model_sha"), self.revision
        if sha and rev and re.fullmatch(r"[0-9a-f]{40}", rev) and sha != rev:
            raise BackendError(f"revision mismatch: the TGI server serves {served}@{sha[:12]} but the recipe pins "
                               f"revision {rev[:12]}; align them or set check_model: false")

    def _load_tokenizer(self):
        return load_tokenizer(self.model, revision=self.revision)

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
            log.debug("%s: POST /tokenize unavailable (%s); using the local tokenizer", self.name, type(exc).__name__)
        if adds is None:
            ids = tok("Hi", add_special_tokens=True).input_ids
            adds = bool(ids) and ids[0] == bos_id and tok("Hi", add_special_tokens=False).input_ids[:1] != [bos_id]
        self.stats["server_adds_bos"] = int(adds)
        return bos if adds else None

    async def _tokenize_probe(self) -> list[int] | None:
        """Ids the server gives "Hi" (TGI's POST /tokenize), None when it cannot say."""
        import httpx2

        async with httpx2.AsyncClient(base_url=self.endpoint, headers=self._headers(),
                                      timeout=min(self.timeout, 30.0)) as h:
            resp = await h.post("/tokenize", json={"inputs": "Hi"})
            data = resp.json() if resp.status_code == 200 else None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return [t.get("id") for t in data]
        return None

    @property
    def _max_input(self) -> int | None:
        return self.server.get("max_input_tokens") or self.server.get("max_input_length")

    @property
    def _max_total(self) -> int | None:
        return self.server.get("max_total_tokens")
