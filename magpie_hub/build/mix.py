"""The closed mix loop of a config with ``mix:`` targets: generate -> classify -> accept into buckets -> steer.

Candidates are numbered 0, 1, 2, ... and generated in waves of ``mix.steer.wave``; wave w's steering
(:mod:`magpie_hub.build.steer`) depends only on the labels of candidates of earlier waves. A finished wave
is classified (the classifier is passed in by the pipeline: the embedding classifier or the LLM judge of
:mod:`magpie_hub.tags.mix_classify`), then its candidates are replayed IN NUMBER ORDER: a candidate is
accepted when every bucket it falls in (per dimension, or its (category, difficulty) pair when ``joint``)
still has room, else discarded as overflow (an unlabelled one as ``unlabelled``). The config is done when
every bucket holds exactly its target count (:func:`magpie_hub.recipe.mix.bucket_targets`), so the mix is
exact: each bucket's share is within half a row of its target.

Two phases per wave: the candidates' instructions are generated first (the response turn is deferred:
the classifier reads the instruction), and only accepted candidates get their conversation written
(phase 2, the instruction given), so a rejected candidate costs its instruction tokens only. A candidate
whose conversation then fails ``max_attempts`` frees its slot for a later candidate of the same wave.

Checkpoint: every candidate is appended to ``DIR/.magpie/build/{config}/candidates-*.jsonl`` as it finishes
(its instruction, arm and tokens; or ``x`` when it exhausted ``max_attempts``), its labels once its wave is
classified, its conversation (``p``) once accepted, and a wave record (generated tokens, drops, seconds)
when the wave ends. Acceptance is never
stored: a resume replays the log, so after ``kill -9`` anywhere the same candidates land in the same
buckets and the config gets the same N rows. The budget (``mix.budget``) is not part of the fingerprint: a
build stopped by it resumes with a larger one. Shards are written only when every bucket is full.
"""

from __future__ import annotations

import copy
import json
import math
import os
import secrets
import time
import uuid as uuid_lib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from magpie_hub.build.buckets import Buckets
from magpie_hub.build.checkpoint import build_state_dir
from magpie_hub.build.manifest import config_entry
from magpie_hub.build.mix_report import mix_report
from magpie_hub.build.steer import Arm, Observed, Steerer
from magpie_hub.dataset.schema import BUILD_FEATURES
from magpie_hub.dataset.shards import shard_count, write_config_shards
from magpie_hub.errors import MagpieError, RecipeError
from magpie_hub.generate.backends.base import GenerationRequest, GenerationResult
from magpie_hub.generate.engine import TRUNCATED, ConversationEngine, ConversationSpec, conversation_to_row
from magpie_hub.recipe.mix import MixTarget, bucket_key
from magpie_hub.recipe.prompts import UUID_NAMESPACE
from magpie_hub.recipe.schema import Recipe
from magpie_hub.recipe.steering_prompts import steering_prompt

LOG_GLOB = "candidates-*.jsonl"


class MixBudgetError(MagpieError):
    """The budget ran out before every bucket was full; accepted candidates stay checkpointed."""


class MixClassifier(Protocol):
    """What the loop needs of a classifier (built by the pipeline from the tags package)."""

    labels: dict[str, tuple[str, ...]]      # dimension -> the official label set

    def classify(self, rows: list[dict]) -> list[dict[str, str | None]]: ...

    def info(self) -> dict[str, Any]: ...


class CandidateLog:
    """Append-only JSONL pieces of one config's candidates (torn last lines ignored; first record wins)."""

    def __init__(self, out: Path, config: str):
        self.dir = build_state_dir(out, config)
        self._fh = None

    def read(self) -> tuple[dict[int, dict], dict[int, dict], dict[int, dict], dict[int, dict]]:
        """(candidate -> row/failure record, candidate -> labels, wave -> wave record; wave -1 holds the
        classifier's calibration, ``{"w": -1, "cal": report}``; candidate -> its phase-2 conversation)."""
        rows: dict[int, dict] = {}
        labels: dict[int, dict] = {}
        waves: dict[int, dict] = {}
        answers: dict[int, dict] = {}
        for path in sorted(self.dir.glob(LOG_GLOB)) if self.dir.is_dir() else []:
            with open(path, "rb") as fh:
                for line in fh:
                    if not line.endswith(b"\n"):
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if "w" in rec:
                        waves.setdefault(int(rec["w"]), rec)
                    elif "p" in rec:
                        answers.setdefault(int(rec["c"]), rec)
                    elif "l" in rec:
                        labels.setdefault(int(rec["c"]), rec["l"])
                    elif "c" in rec:
                        rows.setdefault(int(rec["c"]), rec)
        return rows, labels, waves, answers

    def append(self, rec: dict) -> None:
        if self._fh is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"candidates-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}.jsonl"
            self._fh = open(self.dir / name, "ab")  # noqa: SIM115 - closed in close()
        self._fh.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
        self._fh.flush()

    def sync(self) -> None:
        if self._fh is not None:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None

    def drop(self) -> None:
        for path in self.dir.glob(LOG_GLOB) if self.dir.is_dir() else []:
            path.unlink(missing_ok=True)


def candidate_uuid(seed: int, config: str, candidate: int) -> str:
    return str(uuid_lib.uuid5(UUID_NAMESPACE, f"{seed}/{config}/mix-candidate/{candidate}"))


class _Deferred:
    """The response "backend" of phase 1: no model call; the response is written in phase 2, and only for
    accepted candidates (the classifier reads the instruction)."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return GenerationResult("(deferred)", "stop", 0)


class MixLoop:
    """One config's loop (see the module docstring). ``sampling(mix, max_new)`` and ``cleanup`` come from
    the build (its sampling and clean-up policy); ``classifier`` from the pipeline."""

    def __init__(self, recipe: Recipe, name: str, out: Path, backend, fmt, classifier: MixClassifier, *,
                 sampling: Callable, cleanup, progress=None):
        self.recipe, self.name, self.out, self.fmt = recipe, name, Path(out), fmt
        self.cfg = recipe.configs[name]
        self.mix: MixTarget = self.cfg.mix
        self.backend, self.classifier, self.sampling, self.progress = backend, classifier, sampling, progress
        temps = self.mix.steer.temperatures or [m.temperature for m in recipe.instruction_sampling]
        weights = None if self.mix.steer.temperatures else [m.share for m in recipe.instruction_sampling]
        if weights is not None and len(set(temps)) != len(temps):
            weights = None
        self.steerer = Steerer(self.mix, classifier.labels, seed=recipe.seed, config=name, temperatures=temps,
                               weights=weights)
        self.log = CandidateLog(self.out, name)
        common = dict(cleanup=cleanup, multi_turn_system_prompt=recipe.multi_turn_system_prompt,
                      max_attempts=recipe.max_attempts, seed=recipe.seed,
                      concurrency=recipe.concurrency or backend.info().max_concurrency or 64)
        # phase 1: instructions only; phase 2: the conversation of an accepted candidate (its instruction given)
        self.engine = ConversationEngine(backend, fmt, response_backend=_Deferred(), **common,
                                         on_exhausted=lambda s: self.log.append({"c": s.index, "u": s.uuid, "x": 1}))
        self.answers = ConversationEngine(backend, fmt, **common,
                                          on_exhausted=lambda s: self.log.append({"c": s.index, "p": 1, "x": 1}))
        self.wave_size = self.mix.steer.wave

    # -- pieces --------------------------------------------------------------------------------------
    def _spec(self, candidate: int, arm: Arm, instruction: str | None = None) -> ConversationSpec:
        base = next((m for m in self.recipe.instruction_sampling if m.temperature == arm.temperature),
                    self.recipe.instruction_sampling[0])
        mix = base.model_copy(update={"temperature": arm.temperature})
        return ConversationSpec(
            config=self.name, index=candidate, uuid=candidate_uuid(self.recipe.seed, self.name, candidate),
            turns=self.cfg.turns, category=arm.category, system_prompt=steering_prompt(arm.category, arm.difficulty),
            instruction_params=self.sampling(mix, self.recipe.max_new_tokens.instruction),
            response_params=self.sampling(self.recipe.response_sampling, self.recipe.max_new_tokens.response),
            instruction_stop_newline=self.recipe.cleanup.newline_stop,
            given=((instruction, None),) if instruction is not None else ())

    def _wave_size(self, accepted: int, labelled: int, closed: bool) -> int:
        """Candidates in the next wave: ``steer.wave``, fewer near the end (the rows still missing over the
        acceptance rate so far, at least a quarter wave): a function of the history, so deterministic."""
        left = self.cfg.rows - accepted
        if not closed:
            return min(self.wave_size, left)
        rate = accepted / labelled if labelled else 1.0
        return min(self.wave_size, max(self.wave_size // 4, 1, math.ceil(left / max(rate, 0.05))))

    def _budget_left(self, candidates: int, tokens: int) -> bool:
        budget = self.mix.budget
        if budget.max_generated_rows is not None and candidates >= budget.max_generated_rows:
            return False
        return budget.max_tokens_per_row is None or tokens < budget.max_tokens_per_row * self.cfg.rows

    async def _instructions(self, todo: list[tuple[int, Arm]], rows: dict[int, dict]) -> None:
        """Phase 1: the instructions of candidates ``todo``, each logged as it finishes."""
        arms = dict(todo)
        async for conv in self.engine.run(self._spec(c, arm) for c, arm in todo):
            row = conversation_to_row(conv, model=self.recipe.model, chat_format=self.fmt, seed=self.recipe.seed)
            rec = {"c": conv.spec.index, "u": conv.spec.uuid, "a": arms[conv.spec.index].to_json(),
                   "t": conv.generated_tokens, "f": conv.finish_reasons[0],
                   "r": {k: row[k] for k in ("instruction", "category", "gen_input_configs")}}
            self.log.append(rec)
            rows[conv.spec.index] = rec
        for c, _ in todo:
            rows.setdefault(c, {"c": c, "x": 1})        # exhausted max_attempts (logged by on_exhausted)

    async def _responses(self, todo: list[tuple[int, Arm]], rows: dict[int, dict], answers: dict[int, dict]) -> None:
        """Phase 2: the conversations of accepted candidates (their instruction given), each logged."""
        async for conv in self.answers.run(self._spec(c, arm, rows[c]["r"]["instruction"]) for c, arm in todo):
            c = conv.spec.index
            row = conversation_to_row(conv, model=self.recipe.model, chat_format=self.fmt, seed=self.recipe.seed)
            row["finish_reasons"][0] = rows[c].get("f") or "stop"       # the instruction's own finish reason
            row["truncated"] = any(f in TRUNCATED for f in row["finish_reasons"])
            answers[c] = {"c": c, "p": 1, "t": int(rows[c].get("t") or 0) + conv.generated_tokens, "r": row}
            self.log.append(answers[c])
        for c, _ in todo:
            answers.setdefault(c, {"c": c, "p": 1, "x": 1})

    def _decide(self, cands, buckets: Buckets, labels, rows, answers, accepted: int, closed: bool):
        """Verdicts of a wave's candidates in number order (a copy of ``buckets`` is filled): "failed",
        "unlabelled", "overflow", "accepted", or "after_full" once every bucket is full."""
        verdicts, keys = [], []
        for c, _ in cands:
            key = bucket_key(self.mix, labels[c], self.classifier.labels) if c in labels else None
            keys.append(key)
            done = buckets.full() if closed else accepted >= self.cfg.rows
            if done:
                verdicts.append("after_full")
            elif "r" not in rows[c] or "x" in answers.get(c, {}):
                verdicts.append("failed")
            else:
                verdict = buckets.offer(key) if closed else "accepted"
                accepted += verdict == "accepted"
                verdicts.append(verdict)
        return verdicts, keys

    # -- the loop ------------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """Fill every bucket; return the config's manifest entry (with its ``mix`` report)."""
        rows, labels, waves, answers = self.log.read()
        calibrate = int(getattr(self.classifier, "calibration_sample", 0) or 0)
        if calibrate and -1 in waves:
            self.classifier.restore(waves[-1]["cal"])               # the resumed run's classifier = the first's
        buckets = Buckets(self.mix, self.cfg.rows)
        history: list[Observed] = []
        outcome: Counter = Counter()
        accepted: list[int] = []
        per_candidate: dict[int, tuple[Arm, tuple, str]] = {}
        closed = self.mix.mode == "closed_loop"
        wave = first = 0
        if self.progress is not None:
            self.progress.start(self.name, self.cfg.rows, 0)
        try:
            while not (buckets.full() if closed else len(accepted) >= self.cfg.rows):
                size = self._wave_size(len(accepted), len(history), closed)
                arms = self.steerer.wave(wave, first, size, history, buckets.need())
                if wave == 0 and calibrate:   # the calibration sample: blind arms, so it spans the targets
                    size = calibrate
                    arms = self.steerer.blind_arms(0, size)
                spent = sum(int(w.get("g") or 0) for w in waves.values())
                if not self._budget_left(first, spent):
                    raise self._budget_error(buckets, first, spent)
                limit = self.mix.budget.max_generated_rows
                cands = [(first + i, arm) for i, arm in enumerate(arms) if limit is None or first + i < limit]
                started = time.monotonic()
                tokens0 = self.engine.generated_tokens + self.answers.generated_tokens
                dropped0 = Counter(self.engine.dropped) + Counter(self.answers.dropped)
                todo = [(c, arm) for c, arm in cands if c not in rows]
                if todo:
                    await self._instructions(todo, rows)
                if wave == 0 and calibrate and -1 not in waves:
                    waves[-1] = {"w": -1, "cal": self.classifier.calibrate_rows(
                        [rows[c]["r"] for c, _ in cands if "r" in rows[c]])}
                    self.log.append(waves[-1])
                unlabelled = [c for c, _ in cands if c not in labels and "r" in rows[c]]
                if unlabelled:
                    found = self.classifier.classify([rows[c]["r"] for c in unlabelled])
                    for c, lab in zip(unlabelled, found, strict=True):
                        labels[c] = dict(lab)
                        self.log.append({"c": c, "l": labels[c]})
                    self.log.sync()
                while True:   # a candidate whose response fails frees its slot for a later one of the wave
                    trial = copy.deepcopy(buckets)
                    verdicts, keys = self._decide(cands, trial, labels, rows, answers, len(accepted), closed)
                    todo = [(c, arm) for (c, arm), v in zip(cands, verdicts, strict=True)
                            if v == "accepted" and c not in answers]
                    if not todo:
                        break
                    await self._responses(todo, rows, answers)
                buckets = trial
                for (c, arm), verdict, key in zip(cands, verdicts, keys, strict=True):
                    if verdict in ("failed", "after_full"):
                        outcome[verdict] += 1
                        continue
                    history.append(Observed(arm, key))
                    per_candidate[c] = (arm, key, verdict)
                    if verdict == "accepted":
                        accepted.append(c)
                    else:
                        outcome[verdict] += 1
                spent_now = self.engine.generated_tokens + self.answers.generated_tokens - tokens0
                if spent_now or wave not in waves:
                    dropped = Counter(self.engine.dropped) + Counter(self.answers.dropped) - dropped0
                    waves.setdefault(wave, {"w": wave, "g": spent_now, "d": dict(dropped),
                                            "s": round(time.monotonic() - started, 3)})
                    self.log.append(waves[wave])
                    self.log.sync()
                if self.progress is not None:
                    self.progress.update(self.name, new_rows=len(accepted), tokens=spent + spent_now,
                                         dropped=self.engine.dropped)
                wave += 1
                first += size
        finally:
            self.log.close()
        return self._finish(answers, waves, accepted, per_candidate, outcome, wave)

    def _budget_error(self, buckets: Buckets, candidates: int, tokens: int) -> MixBudgetError:
        need = {k: n for table in buckets.need().values() for k, n in table.items() if n > 0}
        short = ", ".join(f"{k if isinstance(k, str) else '/'.join(k)} {n}" for k, n in sorted(need.items(), key=str))
        budget = self.mix.budget
        larger = (f"mix.budget.max_generated_rows: {2 * candidates}" if budget.max_generated_rows is not None
                  else f"mix.budget.max_tokens_per_row: {2 * (budget.max_tokens_per_row or 0):g}")
        return MixBudgetError(
            f"config {self.name!r}: the mix budget ran out after {candidates} candidates ({tokens:,} generated "
            f"tokens) with {buckets.accepted} of {self.cfg.rows} rows accepted; buckets still short: {short}",
            hint=f"set a larger budget (e.g. {larger}) and re-run the same command: it resumes, the candidates "
                 "so far are kept; nothing was written to the dataset")

    def _finish(self, answers, waves, accepted, per_candidate, outcome, waves_done) -> dict[str, Any]:
        chosen = [answers[c]["r"] for c in accepted]
        shards = shard_count(len(chosen), sum(len(json.dumps(r)) for r in chosen))
        paths = write_config_shards(self.out, self.name, iter(chosen), len(chosen), shards=shards,
                                    features=BUILD_FEATURES)
        generated = len(per_candidate) + outcome["failed"] + outcome["after_full"]
        dropped: Counter = Counter()
        for w in waves.values():
            dropped.update(w.get("d") or {})
        tokens = sum(int(w.get("g") or 0) for w in waves.values())
        stats = [{"dropped": dict(dropped), "generated_tokens": tokens, "world": 1, "backend": self.recipe.backend,
                  "wall_s": sum(float(w.get("s") or 0) for w in waves.values())}]
        kept = sum(int(answers[c].get("t") or 0) for c in accepted)
        entry = config_entry(self.recipe, self.name, stats, shards=len(paths), rows_by_rank={"0": generated},
                             kept_tokens=kept, truncated_rows=sum(bool(r.get("truncated")) for r in chosen))
        entry["mix"] = mix_report(self.mix, self.cfg.rows, self.classifier, per_candidate, accepted, outcome,
                                  tokens=tokens, waves=waves_done)
        self.log.drop()
        return entry


def check_mix_config(recipe: Recipe, name: str, classifier: MixClassifier | None, world: int) -> None:
    """Before anything is written: a mix config needs a classifier and one process."""
    if classifier is None:
        raise RecipeError(f"config {name!r} has mix targets but no classifier was given (build it through "
                          "magpie_hub.pipeline.build)")
    if world > 1:
        raise RecipeError(f"config {name!r}: mix targets are built by one process (the loop is sequential "
                          "between waves); run it without torchrun / accelerate launch")


__all__ = ["Buckets", "CandidateLog", "MixBudgetError", "MixClassifier", "MixLoop", "check_mix_config"]
