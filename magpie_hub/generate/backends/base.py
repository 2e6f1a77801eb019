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
from collections.abc import Iterable, Mapping, Sequence
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


def loop_period(seq: Sequence, *, max_period: int, repeats: int, min_span: int) -> int | None:
    """The period ``p`` (smallest first, ``p <= max_period``) when ``seq`` (tokens or text) ends in a
    periodic tail of at least ``repeats`` copies and ``min_span`` items; None otherwise."""
    n = len(seq)
    if n < max(min_span, repeats):
        return None
    last = seq[-1]
    for p in range(1, min(max_period, n // repeats) + 1):
        span = max(repeats * p, min_span)
        if span <= n and seq[-1 - p] == last and seq[n - span + p:] == seq[n - span:n - p]:
            return p
    return None


def loop_cut(seq: Sequence, period: int) -> int:
    """Length of ``seq`` up to the end of the first copy of its periodic tail of ``period``."""
    start = len(seq) - period
    while start > 0 and seq[start - 1] == seq[start - 1 + period]:
        start -= 1
    return start + period


@dataclass(frozen=True)
class LoopStop:
    """A degenerate loop: the text ends in ``repeats`` or more back-to-back copies of one unit of at most
    ``max_ngram`` tokens, the repeated tail covering at least ``min_tokens`` tokens (so short legitimate
    repetitions such as a table rule or ``0, 0, 0`` do not count). Backends that see tokens stop the turn
    there (the local one); the engine labels any turn cut at ``max_new_tokens`` whose text ends that way
    (periods up to ``TEXT_CHARS_PER_TOKEN * max_ngram`` characters) a "loop" and keeps its first copy."""

    max_ngram: int = 20
    repeats: int = 3
    min_tokens: int = 32
    TEXT_CHARS_PER_TOKEN: ClassVar[int] = 16     # a generous bound: a unit of n tokens is < 16 n characters

    def in_tokens(self, tokens: Sequence[int]) -> bool:
        return loop_period(tokens, max_period=self.max_ngram, repeats=self.repeats,
                           min_span=self.min_tokens) is not None

    def text_cut(self, text: str) -> int | None:
        """Where to cut ``text`` (after the first copy of its loop), or None when it does not end in one."""
        period = loop_period(text, max_period=self.max_ngram * self.TEXT_CHARS_PER_TOKEN, repeats=self.repeats,
                             min_span=self.min_tokens)
        return None if period is None else loop_cut(text, period)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request. ``temperature == 0`` means greedy decoding.

    ``repetition_penalty`` / ``no_repeat_ngram_size`` follow transformers' logits processors (the prompt's
    tokens count as seen); None = off, as the paper. ``loop_stop``: end the turn at a degenerate loop
    (:class:`LoopStop`), where the backend can see it while generating."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    loop_stop: LoopStop | None = None

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
    # SamplingParams fields this backend cannot honour (refused when the recipe loads), e.g. a server API
    # without no_repeat_ngram_size
    unsupported_sampling: ClassVar[frozenset[str]] = frozenset()

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
