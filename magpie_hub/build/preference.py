"""Preference (DPO) configs: k sampled responses per instruction, scored, best vs worst as a TRL pair.

The official Magpie-DPO recipe: ``exp/gen_po_multi_res.py`` samples k = 5 responses at T = 0.8,
``exp/gen_po_rewards.py`` scores each with ArmoRM (``output.score``), ``data_po/process_po.ipynb`` keeps
the highest-scored as ``chosen`` and the lowest as ``rejected``. Here that is one conversation attempt of
:class:`PreferenceEngine`: the instruction (generated, or given by a source row), k responses (request
seeds ``request_seed(seed, uuid, 1, "assistant/j", attempt)``, so independent of scheduling), then the
scorer on the k pairs of that row only (a row's scores never depend on which rows are scored beside it).
All k scores equal, or chosen and rejected the same text, is a tie: the attempt is dropped (counted under
``dropped.tie``) and generated again, so a config holds exactly its rows; rows, scores and all are then
checkpointed like any build row (resumable, exact).

The scorer is a callback (``scorer_factory(reward options) -> object with .score(pairs), .info()``)
handed in by :mod:`magpie_hub.pipeline`: the build never imports the tag stage. Rows are TRL's
conversational preference format: ``prompt`` / ``chosen`` / ``rejected`` as message lists, plus every
response and score, the reward model and the margin.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from datasets import Features, List, Value

from magpie_hub.dataset.schema import BUILD_FEATURES
from magpie_hub.generate.engine import ConversationEngine, ConversationSpec, _Attempt, _Dropped

MESSAGES = List({"role": Value("string"), "content": Value("string")})

PREFERENCE_FEATURES = Features({
    **{k: v for k, v in BUILD_FEATURES.items() if k not in ("conversations", "messages")},
    "prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES,
    "responses": List(Value("string")), "scores": List(Value("float64")),
    "chosen_score": Value("float64"), "rejected_score": Value("float64"), "margin": Value("float64"),
    "reward_model": Value("string"),
})


class Scorer(Protocol):
    def score(self, pairs: list[tuple[Any, Any]]) -> list[float | None]: ...
    def info(self) -> dict[str, Any]: ...


ScorerFactory = Callable[[dict[str, Any]], Scorer]


class PreferenceEngine(ConversationEngine):
    """A conversation engine whose (single) turn holds k responses and their scores.

    A finished :class:`~magpie_hub.generate.engine.Conversation` holds the k samples as k (instruction,
    response) pairs in ``turns`` (sample order); their scores are in :attr:`scores` by uuid."""

    def __init__(self, *args: Any, k: int, scorer: Scorer, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.k, self.scorer = k, scorer
        self.scores: dict[str, list[float]] = {}
        self._lock = threading.Lock()   # one forward pass at a time on the shared reward model

    def _score(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        with self._lock:
            return self.scorer.score(pairs)

    async def _attempt(self, spec: ConversationSpec, attempt: int, state: _Attempt) -> None:
        fmt, rfmt = self.chat_format, self.response_format
        if spec.given:
            user = spec.given[0][0]
            state.finish.append("stop")
        else:
            newline = spec.instruction_stop_newline or self.cleanup.newline_stop
            stop = tuple(fmt.user_stop) + (("\n",) if newline else ())
            user = await self._turn(spec, attempt, 1, "user", self._first_prompt(spec.system_prompt), stop, state,
                                    newline=newline)
        prompt = rfmt.assistant_prompt([], user)
        samples = [_Attempt() for _ in range(self.k)]
        try:
            replies = await asyncio.gather(*(
                self._turn(spec, attempt, 1, "assistant", prompt, tuple(rfmt.assistant_stop), sample, sample=j + 1)
                for j, sample in enumerate(samples)))
        finally:
            state.tokens += sum(s.tokens for s in samples)
        for sample in samples:
            state.finish += sample.finish
        scores = await asyncio.to_thread(self._score, [(user, r) for r in replies])
        if any(s is None for s in scores):
            raise _Dropped("unscored")
        best, worst = pick(scores)
        if scores[best] == scores[worst] or replies[best] == replies[worst]:
            raise _Dropped("tie")
        state.turns = [(user, r) for r in replies]
        self.scores[spec.uuid] = [float(s) for s in scores]


def pick(scores: Sequence[float]) -> tuple[int, int]:
    """(index of the highest score, index of the lowest); the first one on equal scores."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best, worst


def preference_row(base: dict, samples: list[tuple[str, str]], scores: list[float], reward_model: str) -> dict:
    """The TRL conversational preference row from a build row (``base``: uuid, model, configs, category...)
    and the k (instruction, response) samples with their scores."""
    instruction = samples[0][0]
    responses = [r for _, r in samples]
    best, worst = pick(scores)
    row = {k: v for k, v in base.items() if k in PREFERENCE_FEATURES}
    row.update({
        "instruction": instruction, "response": responses[best],
        "prompt": [{"role": "user", "content": instruction}],
        "chosen": [{"role": "assistant", "content": responses[best]}],
        "rejected": [{"role": "assistant", "content": responses[worst]}],
        "responses": responses, "scores": scores,
        "chosen_score": scores[best], "rejected_score": scores[worst], "margin": scores[best] - scores[worst],
        "reward_model": reward_model, "turns": 1,
    })
    return row


def margin_summary(margins: Sequence[float]) -> dict[str, Any]:
    """min / median / mean / max of the chosen - rejected margins (manifest, card, report)."""
    if not margins:
        return {}
    ordered = sorted(margins)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {"rows": n, "min": round(ordered[0], 6), "median": round(median, 6),
            "mean": round(sum(ordered) / n, 6), "max": round(ordered[-1], 6)}


__all__ = ["PREFERENCE_FEATURES", "PreferenceEngine", "Scorer", "ScorerFactory", "margin_summary", "pick",
           "preference_row"]
