"""The generation backend interface: one raw-completion request in, one result out.

MAGPIE needs raw completion (the prompt is a chat-template prefix rendered locally), so every backend
implements a single coroutine, :meth:`Backend.generate`. The conversation engine
(:mod:`magpie_hub.generate.engine`) starts one task per conversation and awaits one request per turn; a
backend is free to batch concurrent requests (the local transformers backend does) or to send them to a
server with bounded concurrency (TGI).

A new backend = one module holding its :class:`BackendOptions` model (the recipe's ``backend_options``,
unknown keys refused) and its :class:`Backend` subclass naming it as ``Options``, + one line in
:data:`magpie_hub.generate.backends.BACKENDS`. Keep the module's top-level imports light: the recipe
loader imports it to validate the options.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from magpie_hub.errors import RecipeError

FinishReason = Literal["stop", "length", "error"]


class BackendOptions(BaseModel):
    """The ``backend_options`` of one backend: subclass it with one field per option (and its default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def keys(cls) -> list[str]:
        return sorted(cls.model_fields)

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None, backend: str) -> BackendOptions:
        """Validated options; a one-line RecipeError naming the valid keys otherwise."""
        if options is not None and not isinstance(options, Mapping):
            raise RecipeError(f"backend_options must be a mapping of {backend} backend options "
                              f"({', '.join(cls.keys())})")
        try:
            return cls.model_validate(dict(options or {}))
        except ValidationError as exc:
            raise RecipeError(cls._describe(exc, backend)) from None

    @classmethod
    def _describe(cls, exc: ValidationError, backend: str) -> str:
        errors = exc.errors()
        unknown = [str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden" and e.get("loc")]
        if unknown:
            which = "option " + repr(unknown[0]) if len(unknown) == 1 else "options " + ", ".join(map(repr, unknown))
            return f"backend_options: unknown {backend} backend {which}; valid keys: {', '.join(cls.keys())}"
        err = errors[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        return f"backend_options.{loc}: {msg} ({backend} backend)" if loc else msg


def cut_at_stop(text: str, stops: Iterable[str]) -> tuple[str, bool]:
    """``text`` up to the earliest of ``stops`` (the stop string excluded), and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


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

    name: ClassVar[str] = "base"
    Options: ClassVar[type[BackendOptions]] = BackendOptions

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        """This backend's validated ``backend_options`` (RecipeError naming the valid keys otherwise)."""
        return cls.Options.parse(options, cls.name)

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
