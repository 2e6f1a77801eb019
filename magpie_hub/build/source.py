"""What a config takes besides the instruction model: existing rows (``source:``), a response model with
its own chat format and backend, reasoning blocks, preference scoring. :class:`Family` validates all of it
before the build writes anything, starts the response backends beside the instruction backend, and gives
the build each config's plan (source uuids), engine, specs, row conversion, features and manifest facts.

Sources are read with ``datasets``: a dataset directory (its config's shards) or a Hub repo at a revision
(``load_dataset(repo, name=config, split=split, revision=...)``; the resolved commit is recorded). The
first ``rows`` rows are used; a source row's uuid is kept (a row whose every attempt fails is replaced
under a uuid derived from it). Modes: ``answer`` (its first instruction, answered by the response model),
``extend`` (its conversation, continued to the config's ``turns``), ``base`` (a base model's answer to
its first instruction in ``base_output``, the source's own response kept: the reward step's
``base_column`` gives ``reward_difference``, as the Air filter reads). Base models have no chat template:
their prompt is URIAL's in-context alignment prompt (Lin et al. 2023, "The Unlocking Spell on Base LLMs:
Rethinking Alignment via In-Context Learning", arXiv:2312.01552): a short preamble and a few stylistic
query/answer examples, then the query.
"""

from __future__ import annotations

import contextlib
import uuid as uuid_lib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from datasets import Features, Value
from huggingface_hub import HfApi

from magpie_hub.build.preference import (
    PREFERENCE_FEATURES,
    PreferenceEngine,
    ScorerFactory,
    margin_summary,
    preference_row,
)
from magpie_hub.chat.format import load_chat_format
from magpie_hub.dataset.schema import BUILD_FEATURES
from magpie_hub.errors import MagpieError, RecipeError
from magpie_hub.generate.backends import SamplingParams, get_backend
from magpie_hub.generate.engine import ConversationEngine, ConversationSpec
from magpie_hub.generate.reasoning import ThinkTags, split_reasoning, think_tags
from magpie_hub.layout import config_names, shard_paths
from magpie_hub.recipe.plan import ConfigPlan
from magpie_hub.recipe.prompts import UUID_NAMESPACE
from magpie_hub.recipe.schema import Recipe
from magpie_hub.recipe.source import SourceRecipe

URIAL_PREAMBLE = (
    "# Instruction\n\nBelow is a list of conversations between a human and an AI assistant (you).\n"
    'Users place their queries under "# Query:", and your responses are under "# Answer:".\n'
    "You are a helpful, respectful, and honest assistant. You answer as helpfully as possible while being "
    "safe, with well-structured, detailed and engaging answers, and you may decline harmful requests.\n\n")
URIAL_EXAMPLES = (
    ("What are three common renewable energy sources?",
     "Three common renewable energy sources are:\n\n1. **Solar power**: sunlight turned into electricity by "
     "photovoltaic panels.\n2. **Wind power**: turbines driven by moving air.\n3. **Hydropower**: the energy "
     "of flowing water, usually through dams.\n\nAll three are replenished naturally and emit little carbon "
     "while running."),
    ("How do I reverse a list in Python?",
     "You can reverse a list in place with `my_list.reverse()`, or get a reversed copy with slicing:\n\n"
     "```python\nreversed_copy = my_list[::-1]\n```\n\nUse the first when you no longer need the original "
     "order, the second when you do."),
)
_FENCE = "```"


class UrialFormat:
    """The prompt of a base (not instruction-tuned) model: URIAL's preamble, examples, history, the query."""

    def __init__(self, model: str):
        self.model = model
        self.assistant_stop = ("\n" + _FENCE, "# Query:")
        self.user_stop = self.assistant_stop
        self.stop = self.assistant_stop

    @staticmethod
    def _pair(query: str, answer: str | None) -> str:
        head = f"# Query:\n{_FENCE}\n{query}\n{_FENCE}\n\n# Answer:\n{_FENCE}\n"
        return head if answer is None else f"{head}{answer}\n{_FENCE}\n\n"

    def assistant_prompt(self, history, user: str, system: str | None = None) -> str:
        shots = "".join(self._pair(q, a) for q, a in (*URIAL_EXAMPLES, *history))
        return URIAL_PREAMBLE + shots + self._pair(user, None)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "urial", "preamble": URIAL_PREAMBLE, "stop": list(self.assistant_stop),
                "paper": "arXiv:2312.01552"}


# -------------------------------------------------------------------------------------------- sources

def _turns_of(row: dict) -> list[tuple[str, str | None]]:
    """A source row's (user, assistant) turns: from ``messages``, ``conversations`` or instruction/response."""
    msgs = row.get("messages")
    if not msgs and row.get("conversations"):
        msgs = [{"role": {"human": "user", "gpt": "assistant"}.get(m.get("from"), m.get("from")),
                 "content": m.get("value")} for m in row["conversations"]]
    if msgs:
        out: list[tuple[str, str | None]] = []
        for m in msgs:
            if m.get("role") == "user":
                out.append((m.get("content") or "", None))
            elif m.get("role") == "assistant" and out and out[-1][1] is None:
                out[-1] = (out[-1][0], m.get("content") or "")
        return out
    if row.get("instruction"):
        return [(row["instruction"], row.get("response"))]
    return []


@dataclass
class SourceRows:
    rows: list[dict]
    info: dict[str, Any]

    @property
    def label(self) -> str:
        """``repo@revision`` or the directory: where the instructions came from."""
        repo = self.info.get("repo")
        return f"{repo}@{self.info.get('revision') or 'main'}" if repo else str(self.info.get("path"))


def _needed(mode: str) -> str:
    return ("messages or conversations" if mode == "extend"
            else "instruction, messages or conversations")


def read_source(src: SourceRecipe, rows: int, where: str) -> SourceRows:
    """The first ``rows`` rows of ``src`` and what was read (repo/path, requested revision, commit)."""
    info: dict[str, Any] = {"mode": src.mode, "split": src.split}
    try:
        if src.path is not None:
            directory = Path(src.path).expanduser()
            names = config_names(directory) if directory.is_dir() else []
            if not names:
                raise RecipeError(f"{where}: source.path {src.path!r} is not a dataset directory with configs",
                                  hint="point source.path at a magpie-hub dataset directory")
            config = src.config or (names[0] if len(names) == 1 else "default" if "default" in names else None)
            if config not in names:
                raise RecipeError(f"{where}: source config {config!r} is not in {src.path} (it has: "
                                  f"{', '.join(names)})", hint="set source.config")
            ds = datasets.Dataset.from_parquet([str(p) for p in shard_paths(directory, config)])
            info.update(path=str(directory), config=config)
        else:
            ds = datasets.load_dataset(src.repo, name=src.config, split=src.split, revision=src.revision)
            sha = HfApi().dataset_info(src.repo, revision=src.revision).sha
            info.update(repo=src.repo, revision=src.revision, sha=sha, config=src.config)
    except MagpieError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's source choice
        raise RecipeError(f"{where}: cannot read source {src.path or src.repo!r} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''})",
                          hint="check source.path / repo, revision, config and split") from None
    columns = set(ds.column_names)
    usable = {"messages", "conversations"} if src.mode == "extend" else {"instruction", "messages", "conversations"}
    if not columns & usable:
        raise RecipeError(f"{where}: the source has no {_needed(src.mode)} column (it has: "
                          f"{', '.join(sorted(columns))})", hint="choose a source with those columns")
    if len(ds) < rows:
        raise RecipeError(f"{where}: the source has {len(ds)} rows, the config asks for {rows}",
                          hint=f"set rows: {len(ds)} or less")
    info.update(rows_available=len(ds), columns=sorted(columns))
    return SourceRows(ds.select(range(rows)).to_list(), info)


class SourcePlan(ConfigPlan):
    """A config plan whose uuids are the source rows' (a replacement k > 0 derives its own from it)."""

    def __init__(self, recipe: Recipe, config: str, uuids: list[str | None]):
        super().__init__(recipe, config)
        self._uuids = uuids

    def uuid(self, index: int, replacement: int = 0) -> str:
        own = self._uuids[index] if index < len(self._uuids) else None
        if not own:
            return super().uuid(index, replacement)
        return own if not replacement else str(uuid_lib.uuid5(UUID_NAMESPACE, f"{own}/replacement-{replacement}"))


# -------------------------------------------------------------------------------------------- family

@dataclass
class ConfigSide:
    name: str
    plan: ConfigPlan
    response_model: Any = None                 # recipe.source.ResponseModel or None
    backend_key: tuple | None = None
    response_format: Any = None
    tags: ThinkTags | None = None
    source: SourceRows | None = None
    scorer: Any = None
    engine_scores: dict[str, list[float]] = field(default_factory=dict)


class Family:
    """Every config's response model, source, reasoning tags and scorer (see the module docstring)."""

    def __init__(self, rec: Recipe, names: list[str], fmt, scorer_factory: ScorerFactory | None = None):
        self.rec, self.fmt = rec, fmt
        self.backends: dict[tuple, Any] = {}
        self.sides: dict[str, ConfigSide] = {}
        formats: dict[tuple, Any] = {}
        scorers: dict[str, Any] = {}
        for name in names:
            cfg, where = rec.configs[name], f"config {name!r}"
            side = ConfigSide(name, rec.plan(name), rec.response_model_for(name))
            mode = cfg.source.mode if cfg.source else None
            if cfg.source is not None:
                side.source = read_source(cfg.source, cfg.rows, where)
                side.plan = SourcePlan(rec, name, [r.get("uuid") for r in side.source.rows])
            rm = side.response_model
            if mode == "base" and rm is None:
                raise RecipeError(f"{where}: source mode base needs a response_model (the base model)",
                                  hint="add response_model: {model: BASE_MODEL} to the config")
            if rm is not None:
                key = (rm.model, rm.revision, rm.backend, repr(sorted(rm.backend_options.items())), mode == "base")
                if key not in formats:
                    formats[key] = UrialFormat(rm.model) if mode == "base" else self._chat_format(rm, where)
                side.backend_key, side.response_format = key, formats[key]
            side.tags = None if mode == "base" else self._tags(side.response_format or fmt)
            if cfg.kind == "preference":
                reward = cfg.preference.reward
                rkey = reward.model_dump_json()
                if rkey not in scorers:
                    if scorer_factory is None:
                        raise RecipeError(f"{where}: preference configs need a reward scorer",
                                          hint="build through `magpie-hub build` (pipeline.build)")
                    scorers[rkey] = scorer_factory(reward.model_dump(exclude_none=True))
                side.scorer = scorers[rkey]
            self.sides[name] = side
        same = (rec.model, rec.revision, rec.backend, rec.backend_options)
        for side in self.sides.values():
            rm = side.response_model   # the instruction model's own backend serves it when it is the same
            if rm is not None and side.backend_key not in self.backends and \
                    (rm.model, rm.revision, rm.backend, rm.backend_options) != same:
                self.backends[side.backend_key] = get_backend(rm.backend, rm.model, revision=rm.revision,
                                                              **rm.backend_options)
        self._stack: contextlib.AsyncExitStack | None = None

    @staticmethod
    def _chat_format(rm, where: str):
        try:
            return load_chat_format(rm.model, revision=rm.revision)
        except MagpieError as exc:
            raise RecipeError(f"{where}: the chat template of response_model {rm.model!r} cannot be derived "
                              f"({exc})", hint="choose an instruction-tuned response model with a chat "
                              "template, or source mode base for a base model") from None

    def _tags(self, fmt) -> ThinkTags | None:
        opts = self.rec.reasoning
        if not opts.split:
            return None
        if opts.open is not None:
            return ThinkTags(opts.open, opts.close)
        return think_tags(getattr(getattr(fmt, "tokenizer", None), "chat_template", None))

    async def __aenter__(self) -> Family:
        self._stack = contextlib.AsyncExitStack()
        for backend in self.backends.values():
            await self._stack.enter_async_context(backend)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._stack is not None:
            await self._stack.aclose()

    # -- per config ----------------------------------------------------------------------------------
    def plan(self, name: str) -> ConfigPlan:
        return self.sides[name].plan

    def features(self, name: str) -> Features:
        side, cfg = self.sides[name], self.rec.configs[name]
        base = PREFERENCE_FEATURES if cfg.kind == "preference" else BUILD_FEATURES
        extra = {}
        if side.tags is not None and cfg.kind != "preference":
            extra["reasoning"] = Value("string")
        if cfg.source is not None and cfg.source.mode == "base":
            extra["base_output"] = Value("string")
        return Features({**base, **extra})

    def engine(self, name: str, backend, fmt, **kwargs) -> ConversationEngine:
        side, cfg = self.sides[name], self.rec.configs[name]
        rb = self.backends.get(side.backend_key) if side.backend_key else None
        kwargs.update(response_backend=rb, response_format=side.response_format)
        if side.tags is not None:   # the instruction model's follow-ups see the answers, not the reasoning
            kwargs["history"] = lambda text, tags=side.tags: split_reasoning(text, tags)[1]
        if cfg.kind == "preference":
            return PreferenceEngine(backend, fmt, k=cfg.preference.k, scorer=side.scorer, **kwargs)
        return ConversationEngine(backend, fmt, **kwargs)

    def spec(self, name: str, spec: ConversationSpec) -> ConversationSpec:
        side, cfg = self.sides[name], self.rec.configs[name]
        if cfg.kind == "preference":
            pref = cfg.preference
            params: SamplingParams = replace(spec.response_params, temperature=pref.temperature, top_p=pref.top_p)
            spec = replace(spec, response_params=params)
        if side.source is not None:
            turns = _turns_of(side.source.rows[spec.index])
            if cfg.source.mode == "extend":
                given = tuple(turns[: cfg.turns])
            else:                                  # answer / base / preference: its first instruction
                given = ((turns[0][0], None),)
            spec = replace(spec, given=given)
        return spec

    def row(self, name: str, conv, row: dict) -> dict:
        """The build row of ``conv`` (``row`` = ``conversation_to_row``'s) for this config's kind."""
        side, cfg = self.sides[name], self.rec.configs[name]
        rm = side.response_model
        if side.source is not None:   # the instructions are the source's: its model and input configs
            src = side.source.rows[conv.spec.index]
            if src.get("model"):
                row["model"] = src["model"]
            given = src.get("gen_input_configs")
            row["gen_input_configs"] = ({k: given.get(k) for k in row["gen_input_configs"]} if isinstance(given, dict)
                                        else dict.fromkeys(row["gen_input_configs"]))
            row["gen_input_configs"]["input_generator"] = (row["gen_input_configs"].get("input_generator")
                                                           or src.get("model") or side.source.label)
        if rm is not None and isinstance(row.get("gen_response_configs"), dict):
            row["gen_response_configs"].update(model=rm.model, engine=rm.backend,
                                               stop=[str(s) for s in side.response_format.assistant_stop])
        if cfg.kind == "preference":
            reward = cfg.preference.reward.model
            return preference_row(row, conv.turns, side.engine_scores.pop(conv.spec.uuid), reward)
        if cfg.source is not None and cfg.source.mode == "base":
            src = side.source.rows[conv.spec.index]
            turns = _turns_of(src)
            row["base_output"] = row["response"]
            row["response"] = turns[0][1] if turns else src.get("response")
            row["conversations"], row["messages"] = _source_messages(turns)
            return row
        if side.tags is not None:
            row["reasoning"] = self._split(row, side.tags)
        return row

    def _split(self, row: dict, tags: ThinkTags) -> str | None:
        """Split reasoning blocks off every response (turn 1's goes to ``reasoning``); inline if asked."""
        first = None
        answers = []
        for m in row["messages"]:
            if m["role"] == "assistant":
                reasoning, answer = split_reasoning(m["content"], tags)
                if not answers:
                    first = reasoning
                answers.append(answer)
                if not self.rec.reasoning.keep_inline:
                    m["content"] = answer
        if not self.rec.reasoning.keep_inline:
            replies = iter(answers)
            for c in row["conversations"]:
                if c["from"] == "gpt":
                    c["value"] = next(replies)
            row["response"] = answers[0] if answers else row["response"]
        return first

    def manifest_entry(self, name: str, out: Path) -> dict[str, Any]:
        side, cfg = self.sides[name], self.rec.configs[name]
        entry: dict[str, Any] = {"kind": cfg.kind}
        if side.response_model is not None:
            rm = side.response_model
            entry["response_model"] = {"id": rm.model, "revision": rm.revision, "backend": rm.backend,
                                       "license": rm.license,
                                       "template": "urial" if isinstance(side.response_format, UrialFormat)
                                       else "chat"}
        if side.source is not None:
            entry["source"] = side.source.info
        if side.tags is not None and cfg.kind != "preference":
            entry["reasoning"] = {**side.tags.as_dict(), "keep_inline": self.rec.reasoning.keep_inline}
        if cfg.kind == "preference":
            margins = [m for p in shard_paths(out, name) for m in pq.read_table(p, columns=["margin"])["margin"].to_pylist()]
            entry["preference"] = {**cfg.preference.settings(), "reward_info": side.scorer.info(),
                                   "margins": margin_summary(margins)}
        return entry

    def attach(self, name: str, engine: ConversationEngine) -> None:
        """Remember the engine of ``name`` (a preference engine's scores are read when its rows are made)."""
        self.sides[name].engine_scores = getattr(engine, "scores", {})


def _source_messages(turns: list[tuple[str, str | None]]) -> tuple[list[dict], list[dict]]:
    conversations, messages = [], []
    for user, reply in turns:
        conversations.append({"from": "human", "value": user})
        messages.append({"role": "user", "content": user})
        if reply is not None:
            conversations.append({"from": "gpt", "value": reply})
            messages.append({"role": "assistant", "content": reply})
    return conversations, messages


__all__ = ["URIAL_PREAMBLE", "ConfigSide", "Family", "SourcePlan", "UrialFormat", "read_source"]
