"""Steering of the mix loop: which system prompt and instruction temperature each candidate gets.

Pure and deterministic. Candidates are numbered and processed in waves of ``steer.wave``; the arms of
wave ``w`` are a function of (recipe, seed, the labels of every candidate of waves < w, the buckets'
fill after them) only, so neither scheduling nor a resume after ``kill -9`` changes any decision.

Closed loop (``mode: closed_loop``), per wave:

1. the wave's slots are shared among the buckets that still need rows, in proportion to their remaining
   need (largest remainder; per dimension, or per (category, difficulty) pair when ``joint``);
2. each slot targeting label L of a dimension picks that dimension's arm by UCB on the observed hit rate
   P(classified L | arm): the arms are "no prompt" and L's own steering prompt (for ``rest``: the prompts
   of the labels it covers); an untried arm's rate starts at a prior (its own prompt optimistic);
3. the instruction temperature is picked the same way, on P(both dimensions hit their targets | temp).

Open-loop baselines: ``natural`` (no system prompt, the recipe's temperatures) and ``blind`` (category /
difficulty prompts drawn at random in proportion to the target shares: what distilabel does).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from magpie_hub.recipe.mix import REST, MixTarget, normalised
from magpie_hub.recipe.plan import exact_counts


@dataclass(frozen=True)
class Arm:
    """One candidate's steering: the category and difficulty prompts (None = not steered) and temperature."""

    category: str | None
    difficulty: str | None
    temperature: float

    def prompt(self, dim: str) -> str | None:
        """The steering label of dimension ``dim`` ("task_category" or "difficulty")."""
        return self.category if dim == "task_category" else self.difficulty

    def to_json(self) -> dict:
        return {"category": self.category, "difficulty": self.difficulty, "temperature": self.temperature}

    @classmethod
    def from_json(cls, data: dict) -> Arm:
        return cls(data.get("category"), data.get("difficulty"), float(data["temperature"]))


@dataclass(frozen=True)
class Observed:
    """A finished candidate as steering sees it: its arm and its bucket coordinates (None = unlabelled)."""

    arm: Arm
    key: tuple


class Steerer:
    """Decides each wave's arms (see the module docstring)."""

    def __init__(self, mix: MixTarget, labels: dict[str, tuple[str, ...]], *, seed: int, config: str,
                 temperatures: Sequence[float], weights: Sequence[float] | None = None):
        self.mix, self.seed, self.config = mix, seed, config
        self.dims = list(mix.dims())
        self.shares = {d: normalised(s) for d, s in mix.dims().items()}
        self.labels = labels
        self.temperatures = list(dict.fromkeys(float(t) for t in temperatures))
        self.weights = list(weights) if weights is not None else [1.0] * len(self.temperatures)

    # -- which prompts may serve a target --------------------------------------------------------------
    def _rest_labels(self, dim: str) -> list[str]:
        return [label for label in self.labels[dim] if label not in self.shares[dim]]

    def options(self, dim: str, target: str) -> list[str | None]:
        enabled = self.mix.steer.category_prompts if dim == "task_category" else self.mix.steer.difficulty_prompts
        if not enabled:
            return [None]
        return [None, *self._rest_labels(dim)] if target == REST else [target, None]

    # -- the waves -------------------------------------------------------------------------------------
    def wave(self, number: int, first: int, size: int, history: Sequence[Observed],
             need: dict[str, Counter]) -> list[Arm]:
        """The arms of wave ``number`` (candidates ``first`` .. ``first + size - 1``) given ``history``
        (candidates of earlier waves, in order) and ``need``: per dimension (or ``"joint"``), remaining rows
        per bucket label/pair."""
        if self.mix.mode == "natural":
            return [Arm(None, None, self._temperature(first + i)) for i in range(size)]
        if self.mix.mode == "blind":
            return [self._blind(first + i) for i in range(size)]
        targets = self._targets(number, size, need)
        total = max(len(history), 1)
        tries: Counter = Counter()      # (dim, prompt) -> labelled candidates steered so
        hits: Counter = Counter()       # (dim, prompt, bucket label) -> of those, classified into the bucket
        for o in history:
            for pos, dim in enumerate(self.dims):
                if o.key[pos] is not None:
                    tries[dim, o.arm.prompt(dim)] += 1
                    hits[dim, o.arm.prompt(dim), o.key[pos]] += 1
        arms, memo = [], {}
        for target in targets:
            key = tuple(sorted(target.items(), key=str))
            if key not in memo:   # same target, same history: same choice
                chosen = {dim: self._pick(dim, target.get(dim), tries, hits, total) for dim in self.dims}
                memo[key] = Arm(chosen.get("task_category"), chosen.get("difficulty"),
                                self._pick_temperature(target, history, total))
            arms.append(memo[key])
        return arms

    def blind_arms(self, first: int, size: int) -> list[Arm]:
        """Arms drawn in proportion to the target shares (the blind baseline; the calibration sample)."""
        return [self._blind(first + i) for i in range(size)]

    def _targets(self, number: int, size: int, need: dict[str, Counter]) -> list[dict[str, str | None]]:
        if "joint" in need:
            pairs = sorted(k for k, n in need["joint"].items() if n > 0)
            if not pairs:
                return [{}] * size
            counts = exact_counts([need["joint"][p] for p in pairs], size)
            return [dict(zip(self.dims, p, strict=True)) for p, n in zip(pairs, counts, strict=True) for _ in range(n)]
        columns = {}
        for pos, dim in enumerate(self.dims):
            labels = sorted(k for k, n in need[dim].items() if n > 0)
            if not labels:
                columns[dim] = [None] * size
                continue
            counts = exact_counts([need[dim][k] for k in labels], size)
            column = [k for k, n in zip(labels, counts, strict=True) for _ in range(n)]
            if pos:   # pair the dimensions' slots at random (seeded): no label always meets the same one
                random.Random(f"{self.seed}/{self.config}/mix/{number}/{dim}").shuffle(column)
            columns[dim] = column
        return [{dim: columns[dim][i] for dim in self.dims} for i in range(size)]

    def _ucb(self, hits: float, tries: float, total: int) -> float:
        return hits / tries + self.mix.steer.exploration * math.sqrt(math.log(total + 1) / tries)

    def _pick(self, dim: str, target: str | None, tries: Counter, hits: Counter, total: int) -> str | None:
        if target is None:
            return None
        best, best_score = None, -math.inf
        for arm in self.options(dim, target):
            prior = 1.0 if arm == target else 0.5          # an untried own prompt is tried first
            score = self._ucb(hits[dim, arm, target] + prior, tries[dim, arm] + 1, total)
            if score > best_score + 1e-12:
                best, best_score = arm, score
        return best

    def _pick_temperature(self, target: dict[str, str | None], history: Sequence[Observed], total: int) -> float:
        if len(self.temperatures) == 1:
            return self.temperatures[0]
        best, best_score = self.temperatures[0], -math.inf
        for t in self.temperatures:
            seen = [o for o in history if o.arm.temperature == t and None not in o.key]
            hits = sum(all(target.get(d) in (None, o.key[i]) for i, d in enumerate(self.dims)) for o in seen)
            score = self._ucb(hits + 0.5, len(seen) + 1, total)
            if score > best_score + 1e-12:
                best, best_score = t, score
        return best

    def _temperature(self, candidate: int) -> float:
        rng = random.Random(f"{self.seed}/{self.config}/mix/temperature/{candidate}")
        return rng.choices(self.temperatures, weights=self.weights)[0]

    def _blind(self, candidate: int) -> Arm:
        rng = random.Random(f"{self.seed}/{self.config}/mix/blind/{candidate}")
        chosen: dict[str, str | None] = {}
        for dim in self.dims:
            labels = list(self.shares[dim])
            pick = rng.choices(labels, weights=[self.shares[dim][k] for k in labels])[0]
            enabled = self.mix.steer.category_prompts if dim == "task_category" else self.mix.steer.difficulty_prompts
            chosen[dim] = pick if pick != REST and enabled else None
        return Arm(chosen.get("task_category"), chosen.get("difficulty"), self._temperature(candidate))


__all__ = ["Arm", "Observed", "Steerer"]
