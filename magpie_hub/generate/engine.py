"""The MAGPIE conversation engine: one asyncio task per conversation, one backend request per turn.

Semantics (the paper's and the official code's, minus their flaws):

* turn 1, user: ``chat_format.user_prompt([], system=spec.system_prompt)`` — the pre-query template, or the
  category pre-query with its system prompt; the model writes the instruction itself.
* every response: ``chat_format.assistant_prompt(history, user)`` WITHOUT any system prompt.
* turn k+1, user: ``chat_format.user_prompt(history, system=multi_turn_system_prompt)`` (the official
  multi-turn system prompt + the rendered history + the next user header).
* user turns stop at ``chat_format.user_stop``, assistant turns at ``chat_format.assistant_stop``.
* truncated turns: a turn cut at ``max_new_tokens`` ("length"), or whose text ends in a degenerate loop
  (``SamplingParams.loop_stop``: then "loop", cut after the loop's first copy), is dropped or kept per role
  (``CleanupOptions.truncated_instruction`` / ``truncated_response``; default: instructions dropped,
  responses kept, as the official code). Each kept turn's finish reason ("stop", "length", "loop") is
  recorded, per message, in the row (``finish_reasons``, ``truncated``) so filters can decide.
* clean-up: strip; drop empty, instructions ending with ":", texts containing a template stop marker; the
  official newline stop only as an option.
* a conversation with any failed/dropped turn is discarded whole (counted by reason in ``dropped``) and
  regenerated from scratch with new attempt seeds, up to ``max_attempts``; half-made conversations are
  never yielded. A spec that exhausts its attempts is recorded in ``exhausted`` (and ``on_exhausted`` is
  called); ``replace(spec)`` may give a replacement spec (same row, a new uuid: new seeds), generated in the
  same task; without one the spec is recorded in ``failed`` and not yielded.
* request seeds depend only on (base seed, uuid, turn, role, attempt): a row's content does not depend on
  scheduling or on which batch its requests land in.
* conversations run concurrently (bounded by ``concurrency``); turn k+1 is sent as soon as turn k
  returns (no lockstep between conversations). Specs are pulled lazily, so memory stays flat.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from magpie_hub.generate.backends.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    LoopStop,
    SamplingParams,
    cut_at_stop,
)

Role = Literal["user", "assistant"]
TruncationPolicy = Literal["drop", "keep"]
TRUNCATED = ("length", "loop")              # finish reasons of a truncated turn


@dataclass(frozen=True)
class ConversationSpec:
    """One row to generate."""

    config: str
    index: int
    uuid: str
    turns: int
    category: str | None                 # category name or None
    system_prompt: str | None            # category system prompt for the FIRST instruction, or None
    instruction_params: SamplingParams
    response_params: SamplingParams
    instruction_stop_newline: bool = False
    replacement: int = 0                 # 0 = the row's own spec; k = its k-th replacement (new uuid)


@dataclass
class Conversation:
    """A finished conversation: ``turns`` holds cleaned (user, assistant) pairs, one per turn."""

    spec: ConversationSpec
    turns: list[tuple[str, str]]
    generated_tokens: int                # tokens of the kept attempt
    attempts: int                        # 1 = first try succeeded
    finish: list[str] | None = None      # per message (user, assistant, ...): "stop", "length" or "loop"

    @property
    def finish_reasons(self) -> list[str]:
        return list(self.finish) if self.finish is not None else ["stop"] * (2 * len(self.turns))


@dataclass(frozen=True)
class CleanupOptions:
    strip: bool = True
    drop_empty: bool = True
    drop_colon_ending: bool = True       # instructions only
    newline_stop: bool = False           # the official one-line instructions (off by default)
    truncated_instruction: TruncationPolicy = "drop"
    truncated_response: TruncationPolicy = "keep"   # the official code keeps them; filters decide

    def truncation(self, role: Role) -> TruncationPolicy:
        return self.truncated_instruction if role == "user" else self.truncated_response


def request_seed(base: int, uuid: str, turn: int, role: str, attempt: int) -> int:
    """A 63-bit request seed that depends only on its arguments (never on scheduling)."""
    key = f"{base}\x00{uuid}\x00{turn}\x00{role}\x00{attempt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


@dataclass
class _Dropped(Exception):
    reason: str
    tokens: int = 0


@dataclass
class _Attempt:
    turns: list[tuple[str, str]] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    tokens: int = 0


class ConversationEngine:
    """Generates conversations from :class:`ConversationSpec` through any :class:`Backend`."""

    def __init__(self, backend: Backend, chat_format, *, cleanup: CleanupOptions | None = None,
                 multi_turn_system_prompt: str | None = None, max_attempts: int = 10, concurrency: int = 64,
                 seed: int = 0, replace: Callable[[ConversationSpec], ConversationSpec | None] | None = None,
                 on_exhausted: Callable[[ConversationSpec], None] | None = None):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.backend = backend
        self.chat_format = chat_format
        self.cleanup = cleanup or CleanupOptions()
        self.multi_turn_system_prompt = multi_turn_system_prompt or None
        self.max_attempts = max_attempts
        self.concurrency = concurrency
        self.seed = seed                                  # used when a spec's params carry no seed
        self.dropped: collections.Counter = collections.Counter()
        self.generated_tokens = 0                         # all attempts, kept or dropped
        self.kept_tokens = 0                              # tokens of the yielded conversations
        self.truncated_kept: collections.Counter = collections.Counter()   # kept truncated turns by reason
        self.requests = 0
        self.replace, self.on_exhausted = replace, on_exhausted
        self.exhausted: list[ConversationSpec] = []       # every spec that failed max_attempts times
        self.failed: list[ConversationSpec] = []          # rows given up (exhausted, no replacement left)
        self.replaced = 0                                 # conversations yielded under a replacement spec
        self._first_prompts: dict[str | None, str] = {}
        self._markers = tuple(s for s in getattr(chat_format, "stop", ()) if s and s.strip())

    # -- public --------------------------------------------------------------------------------------------
    async def run(self, specs: Iterable[ConversationSpec]) -> AsyncIterator[Conversation]:
        """Yield each conversation as soon as it is finished (completion order, not spec order)."""
        it = iter(specs)
        pending: set[asyncio.Task] = set()
        exhausted_input = False
        try:
            while True:
                while not exhausted_input and len(pending) < self.concurrency:
                    spec = next(it, None)
                    if spec is None:
                        exhausted_input = True
                        break
                    pending.add(asyncio.ensure_future(self.conversation(spec)))
                if not pending:
                    return
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                # a backend's permanent error (MagpieError) stops the run; every failed task's exception is
                # retrieved here (no "exception was never retrieved" noise) and the first one is raised
                errors = [exc for exc in (t.exception() for t in done if not t.cancelled()) if exc is not None]
                if errors:
                    raise errors[0]
                finished = [conv for conv in (task.result() for task in done) if conv is not None]
                for conv in sorted(finished, key=lambda c: c.spec.index):
                    yield conv
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def conversation(self, spec: ConversationSpec) -> Conversation | None:
        """Generate one row: its spec, then its replacements while one exhausts ``max_attempts``; None when
        no replacement is left."""
        if spec.turns < 1:
            raise ValueError(f"turns must be >= 1 (spec {spec.uuid})")
        while True:
            conv = await self._attempts(spec)
            if conv is not None:
                self.replaced += spec.replacement > 0
                self.kept_tokens += conv.generated_tokens
                self.truncated_kept.update(f for f in conv.finish_reasons if f in TRUNCATED)
                return conv
            self.exhausted.append(spec)
            if self.on_exhausted is not None:
                self.on_exhausted(spec)
            following = self.replace(spec) if self.replace is not None else None
            if following is None:
                self.failed.append(spec)
                return None
            spec = following

    async def _attempts(self, spec: ConversationSpec) -> Conversation | None:
        """One spec, regenerated from scratch after a dropped turn; None when ``max_attempts`` are used up."""
        for attempt in range(1, self.max_attempts + 1):
            state = _Attempt()
            try:
                await self._attempt(spec, attempt, state)
            except _Dropped as drop:
                self.dropped[drop.reason] += 1
                continue
            finally:
                self.generated_tokens += state.tokens
            return Conversation(spec=spec, turns=state.turns, generated_tokens=state.tokens, attempts=attempt,
                                finish=state.finish)
        return None

    # -- one attempt -----------------------------------------------------------------------------------------
    def _first_prompt(self, system: str | None) -> str:
        if system not in self._first_prompts:
            self._first_prompts[system] = self.chat_format.user_prompt([], system=system)
        return self._first_prompts[system]

    async def _attempt(self, spec: ConversationSpec, attempt: int, state: _Attempt) -> None:
        fmt = self.chat_format
        newline = spec.instruction_stop_newline or self.cleanup.newline_stop
        for turn in range(1, spec.turns + 1):
            if turn == 1:
                prompt = self._first_prompt(spec.system_prompt)
            else:
                prompt = fmt.user_prompt(state.turns, system=self.multi_turn_system_prompt)
            stop = tuple(fmt.user_stop) + (("\n",) if newline else ())
            user = await self._turn(spec, attempt, turn, "user", prompt, stop, state, newline=newline)
            prompt = fmt.assistant_prompt(state.turns, user)
            reply = await self._turn(spec, attempt, turn, "assistant", prompt, tuple(fmt.assistant_stop), state)
            state.turns.append((user, reply))

    async def _turn(self, spec: ConversationSpec, attempt: int, turn: int, role: Role, prompt: str,
                    stop: tuple[str, ...], state: _Attempt, *, newline: bool = False) -> str:
        params = spec.instruction_params if role == "user" else spec.response_params
        base = params.seed if params.seed is not None else self.seed
        params = replace(params, seed=request_seed(base, spec.uuid, turn, role, attempt))
        self.requests += 1
        result = await self.backend.generate(GenerationRequest(prompt=prompt, params=params, stop=stop, role=role))
        state.tokens += max(0, int(result.generated_tokens or 0))
        reason, text, finish = self.clean(result, role, newline=newline, loop=params.loop_stop)
        if reason is not None:
            raise _Dropped(reason)
        state.finish.append(finish)
        return text

    def clean(self, result: GenerationResult, role: Role, *, newline: bool = False,
              loop: LoopStop | None = None) -> tuple[str | None, str, str]:
        """(drop reason or None, cleaned text, finish reason: "stop", "length", "loop" or "error")."""
        opts = self.cleanup
        if result.finish_reason == "error":
            return "error", "", "error"
        text, finish = result.text or "", result.finish_reason
        if newline and role == "user":
            text, cut = cut_at_stop(text, ("\n",))
            finish = "stop" if cut else finish
        if finish == "length" and loop is not None and (cut_at := loop.text_cut(text)) is not None:
            text, finish = text[:cut_at], "loop"
        if finish in TRUNCATED and opts.truncation(role) == "drop":
            return ("truncated" if finish == "length" else "loop"), text, finish
        if opts.strip:
            text = text.strip()
        if opts.drop_empty and not text.strip():
            return "empty", text, finish
        if role == "user" and opts.drop_colon_ending and text.rstrip().endswith(":"):
            return "colon", text, finish
        if any(marker in text for marker in self._markers):
            return "role_leak", text, finish      # a template marker inside a turn: roles would mix
        return None, text, finish


@functools.lru_cache(maxsize=256)
def _pre_query(chat_format, system: str | None) -> str:
    return chat_format.pre_query if system is None else chat_format.pre_query_system(system)


def conversation_to_row(conv: Conversation, *, model: str, chat_format, seed: int,
                        input_generator: str | None = None) -> dict:
    """One dataset row (``schema.BUILD_FEATURES``) from a finished conversation."""
    spec = conv.spec
    params = spec.instruction_params
    turns: Sequence[tuple[str, str]] = conv.turns
    conversations, messages = [], []
    for user, reply in turns:
        conversations += [{"from": "human", "value": user}, {"from": "gpt", "value": reply}]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {
        "uuid": spec.uuid,
        "model": model,
        "gen_input_configs": {
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "seed": int(params.seed if params.seed is not None else seed),
            "pre_query_template": _pre_query(chat_format, spec.system_prompt),
            "input_generator": input_generator or model,
        },
        "instruction": turns[0][0],
        "response": turns[0][1],
        "conversations": conversations,
        "messages": messages,
        "turns": len(turns),
        "category": spec.category,
        "truncated": any(f in TRUNCATED for f in conv.finish_reasons),
        "finish_reasons": conv.finish_reasons,
    }


__all__ = ["TRUNCATED", "CleanupOptions", "Conversation", "ConversationEngine", "ConversationSpec",
           "conversation_to_row", "request_seed"]
