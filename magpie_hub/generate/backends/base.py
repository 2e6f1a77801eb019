"""The generation backend interface: one raw-completion request in, one result out.

MAGPIE needs raw completion (the prompt is a chat-template prefix rendered locally), so every backend
implements a single coroutine, :meth:`Backend.generate`. The conversation engine
(:mod:`magpie_hub.generate.engine`) starts one task per conversation and awaits one request per turn; a
backend is free to batch concurrent requests (the local transformers backend does) or to send them to a
server with bounded concurrency (TGI). A new backend = a config class + a Backend subclass + one entry in
:func:`magpie_hub.generate.backends.get_backend`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request. ``temperature == 0`` means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """One raw completion: ``prompt`` is sent as-is (it already carries BOS when the template does)."""

    prompt: str
    params: SamplingParams
    stop: tuple[str, ...] = ()
    role: Literal["user", "assistant", "judge"] = "assistant"


@dataclass(frozen=True)
class GenerationResult:
    """``finish_reason`` is "stop" when an end-of-turn token/stop string ended the text (not included),
    "length" when max_new_tokens was hit (a truncated turn), "error" when the backend gave up."""

    text: str
    finish_reason: FinishReason
    generated_tokens: int
    error: str | None = None


@dataclass
class BackendInfo:
    """What the backend reports about itself, recorded in the manifest and the card."""

    name: str
    model_id: str
    model_revision: str | None = None
    max_concurrency: int | None = None
    extra: dict = field(default_factory=dict)


class Backend(abc.ABC):
    """Base class of generation backends. Use as ``async with backend: ...``."""

    name: str = "base"

    async def __aenter__(self) -> Backend:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load weights / connect / validate the server. Raise MagpieError subclasses on bad config."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Complete ``request.prompt``; never raise for a transient failure of one request: return a
        result with ``finish_reason="error"`` (the engine regenerates the conversation). Raise
        :class:`magpie_hub.errors.BackendError` for permanent failures (auth, bad endpoint)."""

    @abc.abstractmethod
    def info(self) -> BackendInfo:
        """Describe the backend and model."""
