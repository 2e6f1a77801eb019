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
from magpie_hub.generate.row_extras import response_configs

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
    # turns given by a source dataset, (user, assistant or None): kept as they are; a None assistant is
    # answered (build/source.py)
    given: tuple[tuple[str, str | None], ...] = ()
    # MAGPIE fidelity (chat/official.py, recipe/chat.py): the first instruction's prompt when no system prompt
    # is given (None: the template's pre-query), and the sampling of follow-up instructions (None: the row's)
    pre_query: str | None = None
    follow_up_params: SamplingParams | None = None


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
    tokens: int = 0          # generated by every attempt of this conversation
    wasted: int = 0          # of which in dropped turns
    turn_start: int = 0      # ``tokens`` when the turn in progress started


class ConversationEngine:
    """Generates conversations from :class:`ConversationSpec` through any :class:`Backend`."""

    def __init__(self, backend: Backend, chat_format, *, cleanup: CleanupOptions | None = None,
                 multi_turn_system_prompt: str | None = None, max_attempts: int = 10, concurrency: int = 64,
                 seed: int = 0, replace: Callable[[ConversationSpec], ConversationSpec | None] | None = None,
                 on_exhausted: Callable[[ConversationSpec], None] | None = None,
                 response_backend: Backend | None = None, response_format=None,
                 history: Callable[[str], str] | None = None):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.backend = backend
        self.chat_format = chat_format
        # responses from another model, rendered with its own chat format (None: the instruction model)
        self.response_backend = response_backend or backend
        self.response_format = response_format or chat_format
        self.history = history          # what the instruction model sees of a response (reasoning split off)
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
        """One spec; after a dropped turn the next attempt keeps the finished turns before it and generates
        that turn again (a multi-turn row does not throw away its first turns for one capped follow-up).
        Attempts are numbered per conversation, so seeds never depend on scheduling. None when
        ``max_attempts`` are used up."""
        state = _Attempt()
        for attempt in range(1, self.max_attempts + 1):
            before = state.tokens
            try:
                await self._attempt(spec, attempt, state)
            except _Dropped as drop:
                self.dropped[drop.reason] += 1
                del state.finish[2 * len(state.turns):]   # the finished turns stay, the failed one goes
                state.wasted += state.tokens - state.turn_start
                continue
            finally:
                self.generated_tokens += state.tokens - before
            return Conversation(spec=spec, turns=state.turns, generated_tokens=state.tokens - state.wasted,
                                attempts=attempt, finish=state.finish)
        return None

    # -- one attempt -----------------------------------------------------------------------------------------
    def _first_prompt(self, system: str | None) -> str:
        if system not in self._first_prompts:
            self._first_prompts[system] = self.chat_format.user_prompt([], system=system)
        return self._first_prompts[system]

    async def _attempt(self, spec: ConversationSpec, attempt: int, state: _Attempt) -> None:
        fmt = self.chat_format
        newline = spec.instruction_stop_newline or self.cleanup.newline_stop
        rfmt = self.response_format
        for turn in range(len(state.turns) + 1, spec.turns + 1):   # resumes after the kept turns
            state.turn_start = state.tokens
            given = spec.given[turn - 1] if turn <= len(spec.given) else None
            if given is not None and given[1] is not None:   # a source turn, kept as it is
                state.turns.append((given[0], given[1]))
                state.finish += ["stop", "stop"]
                continue
            if given is not None:
                user = given[0]
                state.finish.append("stop")
            else:
                if turn == 1:
                    prompt = (spec.pre_query if spec.pre_query is not None and spec.system_prompt is None
                              else self._first_prompt(spec.system_prompt))
                else:
                    seen = [(u, self.history(a)) for u, a in state.turns] if self.history else state.turns
                    prompt = fmt.user_prompt(seen, system=self.multi_turn_system_prompt)
                stop = tuple(fmt.user_stop) + (("\n",) if newline else ())
                user = await self._turn(spec, attempt, turn, "user", prompt, stop, state, newline=newline)
            prompt = rfmt.assistant_prompt(state.turns, user)
            reply = await self._turn(spec, attempt, turn, "assistant", prompt, tuple(rfmt.assistant_stop), state)
            state.turns.append((user, reply))

    async def _turn(self, spec: ConversationSpec, attempt: int, turn: int, role: Role, prompt: str,
                    stop: tuple[str, ...], state: _Attempt, *, newline: bool = False, sample: int = 0) -> str:
        params = spec.instruction_params if role == "user" else spec.response_params
        if role == "user" and turn > 1 and spec.follow_up_params is not None:
            params = spec.follow_up_params
        base = params.seed if params.seed is not None else self.seed
        key = f"{role}/{sample}" if sample else role   # sample j > 0 of k responses (preference configs)
        params = replace(params, seed=request_seed(base, spec.uuid, turn, key, attempt))
        self.requests += 1
        backend = self.backend if role == "user" else self.response_backend
        result = await backend.generate(GenerationRequest(prompt=prompt, params=params, stop=stop, role=role))
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
                        input_generator: str | None = None, engine: str | None = None) -> dict:
    """One dataset row (``schema.BUILD_FEATURES``; the build adds ``instruction_k`` / ``response_k`` of
    multi-turn configs, ``row_extras.with_turn_columns``); ``engine`` = the backend in ``gen_response_configs``."""
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
            "pre_query_template": (spec.pre_query if spec.pre_query is not None and spec.system_prompt is None
                                   else _pre_query(chat_format, spec.system_prompt)),
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
        "gen_response_configs": response_configs(spec.response_params, model=model, engine=engine,
                                                 stop=getattr(chat_format, "assistant_stop", ())),
    }


__all__ = ["TRUNCATED", "CleanupOptions", "Conversation", "ConversationEngine", "ConversationSpec",
           "conversation_to_row", "request_seed"]
