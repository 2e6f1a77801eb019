"""A deterministic fake backend for fast tests and dry runs (like lighteval's dummy model).

No model is loaded: the text of a request is a pure function of (prompt, seed, role), made of words
from a small vocabulary, so the same recipe and seed give identical rows under any scheduling. Options
(recipe ``backend_options``) inject failures deterministically, per request, to exercise the engine's
drop-and-regenerate path: ``error_rate``, ``truncate_rate``, ``empty_rate``, ``colon_rate`` (fractions of
requests), ``delay_ms`` (sleep per request, to make runs slow enough to be killed), ``words`` (max words
per text; more than ``max_new_tokens`` gives finish_reason "length"), ``max_concurrency``.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from pydantic import Field

from magpie_hub.generate.backends.base import (
    Backend,
    BackendInfo,
    BackendOptions,
    GenerationRequest,
    GenerationResult,
)

_WORDS = (
    "explain how why what prime numbers sort list python function graph river mountain history poem "
    "write code translate french german equation integral derivative solve plan trip budget recipe bread "
    "story dragon summary article compare contrast energy solar climate market price data table query "
    "step example proof theorem vector matrix cell protein music chord rhythm garden soil water"
).split()


class DummyOptions(BackendOptions):
    error_rate: float = Field(0.0, ge=0.0, lt=1.0)       # fractions of requests, in [0, 1)
    truncate_rate: float = Field(0.0, ge=0.0, lt=1.0)
    empty_rate: float = Field(0.0, ge=0.0, lt=1.0)
    colon_rate: float = Field(0.0, ge=0.0, lt=1.0)
    delay_ms: float = 0.0
    words: int = 12
    max_concurrency: int | None = None


class DummyBackend(Backend):
    """Fake completions: deterministic, fast, with optional injected faults."""

    name = "dummy"
    Options = DummyOptions

    def __init__(self, model: str, *, revision: str | None = None, **options):
        opts = self.parse_options(options)
        self.model, self.revision = model, revision
        self.rates = (opts.error_rate, opts.truncate_rate, opts.empty_rate, opts.colon_rate)
        self.delay = float(opts.delay_ms) / 1000.0
        self.words = max(1, int(opts.words))
        self.max_concurrency = opts.max_concurrency
        self.requests = 0

    def _rng(self, request: GenerationRequest) -> random.Random:
        key = f"{request.params.seed}\x00{request.role}\x00{request.prompt}".encode()
        return random.Random(hashlib.sha256(key).hexdigest())

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        rng = self._rng(request)
        error, truncate, empty, colon = self.rates
        roll = rng.random()
        if roll < error:
            return GenerationResult("", "error", 0, error="injected error")
        roll -= error
        n = rng.randint(max(1, self.words // 2), self.words)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if roll < truncate:
            n = request.params.max_new_tokens + 1
            words = (words * (n // len(words) + 1))[:n]
        elif roll - truncate < empty:
            return GenerationResult("  ", "stop", 1)
        limit = request.params.max_new_tokens
        if len(words) > limit:
            return GenerationResult(" ".join(words[:limit]), "length", limit)
        text = " ".join(words)
        text = text[0].upper() + text[1:]
        if roll - truncate - empty < colon:
            text += ":"
        else:
            text += "?" if request.role == "user" else "."
        return GenerationResult(text, "stop", len(words))

    def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, model_id=self.model, model_revision=self.revision,
                           max_concurrency=self.max_concurrency, extra={"rates": list(self.rates)})
