"""LLM-judge tag steps: ``task_category``, ``difficulty``, ``quality`` (the official MAGPIE tags).

Each step asks a judge model (default Llama-3-8B-Instruct, as in the paper) one question per row about
the row's ``instruction``, through ANY backend (``backend: transformers | tgi | scripted``) with the
judge's own chat template, greedy (temperature 0), requests issued concurrently (bounded) so the
transformers backend batches them and a TGI server gets parallel requests. As in the official tagger
the assistant turn is pre-filled with ``{``. Answers are parsed by :mod:`magpie_hub.tags.judge_parse`;
an unparseable answer, an off-label value or a failed request gives null columns for that row, and is
counted (printed, and recorded in the manifest's ``tags.steps.<name>.counts``) — never a crash, never
a guessed label. ``*_generator`` names the judge on every row it tagged.

Step options (recipe ``tags: [{task_category: {...}}]``): ``model``, ``revision``, ``backend``
(default ``transformers``), ``backend_options`` (dict; ``endpoint`` may also be given directly),
``concurrency`` (requests in flight, default 64), ``max_new_tokens``, ``prefill`` (default true),
``batch_size`` (rows per checkpointed chunk).
"""

from __future__ import annotations

import abc
import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, ClassVar

from rich.console import Console

from magpie_hub.chat.format import load_chat_format
from magpie_hub.errors import MagpieError, RecipeError, redact, redact_mapping
from magpie_hub.generate.backends import get_backend
from magpie_hub.generate.backends.base import GenerationRequest, GenerationResult, SamplingParams
from magpie_hub.models import resolve_model
from magpie_hub.tags.base import Batch, TagContext, TagStep
from magpie_hub.tags.columns import TASK_CATEGORIES
from magpie_hub.tags.judge_parse import extract_object, free_text, get_key, normalise_label

DEFAULT_JUDGE = "meta-llama/Meta-Llama-3-8B-Instruct"

_STEP_OPTIONS = {"model", "revision", "backend", "backend_options", "endpoint", "concurrency", "max_new_tokens",
                 "prefill", "batch_size"}


def _query_block(instruction: str) -> str:
    return f"## User query\n```\n{instruction}\n```\n"


def classification_prompt(instruction: str) -> str:
    tags = "\n".join(f'    "{name}",  # {desc}' for name, desc in TASK_CATEGORIES.items())
    return (
        "# Task\n\nAssign task tags to the user query below.\n\n" + _query_block(instruction) +
        "\n## Tags\nRead the query and choose the single task tag from this list that fits it best:\n\n"
        f"all_task_tags = [\n{tags}\n]\n\n"
        "## Output format\nGive exactly one primary tag. Any other tags from the list that also apply go in "
        "the list of other tags. Answer with JSON only, replacing the <...> placeholders:\n"
        "```\n{\n    \"primary_tag\": \"<primary tag>\",\n    \"other_tags\": [\"<tag 1>\", \"<tag 2>\", ...]\n}\n```\n"
    )


def difficulty_prompt(instruction: str) -> str:
    return (
        "# Task\n\nFirst work out what the user intends and what knowledge answering requires, then rate how "
        "difficult the user query is, judging from its content.\n\n" + _query_block(instruction) +
        "\n## Output format\nState the user's intent and the knowledge needed to solve the task. Then rate "
        "the difficulty as `very easy`, `easy`, `medium`, `hard` or `very hard`.\n"
        "Answer with JSON only, replacing the [...] placeholders:\n"
        "```\n{\n    \"intent\": \"The user wants to [...]\",\n"
        "    \"knowledge\": \"To solve this problem, the models need to know [...]\",\n"
        "    \"difficulty\": \"[very easy/easy/medium/hard/very hard]\"\n}\n```\n"
    )


def quality_prompt(instruction: str) -> str:
    return (
        "# Task\n\nRate the quality of the user query: how clear, specific and coherent it is.\n\n"
        "Rating scale:\n"
        "- very poor: unclear, vague or incoherent; essential information and context are missing.\n"
        "- poor: somewhat unclear or missing important details; it needs substantial clarification.\n"
        "- average: moderately clear and specific; some additional information may be needed to fully "
        "understand it.\n"
        "- good: clear, specific and mostly well-formed, with enough context to understand the intent.\n"
        "- excellent: very clear, specific and well-articulated, with all the information and context a "
        "comprehensive answer needs.\n\n" + _query_block(instruction) +
        "\n## Output format\nFirst assess the query, naming its strengths and/or weaknesses. Then give a "
        "rating from very poor to excellent. Answer with JSON only, replacing the [...] placeholders:\n"
        "```\n{\n    \"explanation\": \"[...]\",\n    \"input_quality\": \"[very poor/poor/average/good/excellent]\"\n}\n```\n"
    )


class BackendStep(TagStep):
    """A rows-scope step that sends one greedy completion per row through a generation backend and
    parses it. Subclasses give ``default_model``, :meth:`prompt_for` and :meth:`parse`."""

    default_model: ClassVar[str] = DEFAULT_JUDGE
    default_max_new_tokens: ClassVar[int] = 256
    batch_size = 1_000
    allowed_options: ClassVar[set[str]] = _STEP_OPTIONS

    def __init__(self, context: TagContext, **options: Any):
        super().__init__(context, **options)
        unknown = sorted(set(self.options) - self.allowed_options)
        if unknown:
            raise RecipeError(f"tag step {self.name!r}: unknown options {unknown}; allowed: "
                              f"{', '.join(sorted(self.allowed_options))}")
        self.model = str(self.options.get("model") or self.default_model)
        self.revision = self.options.get("revision")
        self.backend_name = str(self.options.get("backend") or "transformers")
        backend_options = self.options.get("backend_options") or {}
        if not isinstance(backend_options, dict):
            raise RecipeError(f"tag step {self.name!r}: backend_options must be a mapping")
        self.backend_options = dict(backend_options)
        if self.options.get("endpoint"):
            self.backend_options["endpoint"] = self.options["endpoint"]
        self.concurrency = self._positive("concurrency", 64)
        self.max_new_tokens = self._positive("max_new_tokens", self.default_max_new_tokens)
        self.counts = {"rows": 0, "tagged": 0, "unparseable": 0, "off_label": 0, "failed": 0, "no_input": 0}
        self.backend = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: ThreadPoolExecutor | None = None

    @property
    def generator_column(self) -> str:
        """The column naming the judge on every row it tagged (registered with the step's columns)."""
        return f"{self.name}_generator"

    def _positive(self, key: str, default: int) -> int:
        value = self.options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeError(f"tag step {self.name!r}: {key} must be a whole number >= 1 (got {value!r})")
        return value

    # -- lifecycle ------------------------------------------------------------------------------
    def setup(self) -> None:
        self.resolved = resolve_model(self.model)
        self.prepare(self.resolved)
        options = dict(self.backend_options)
        if self.backend_name == "transformers":  # the step's own prompt format: no second template parse
            options.setdefault("chat_format", self.backend_format())
        self.backend = get_backend(self.backend_name, self.resolved, revision=self.revision, **options)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tag-{self.name}")
        self._loop = asyncio.new_event_loop()
        self._call(self.backend.start())

    def prepare(self, model: str) -> None:
        """Load what building prompts needs (chat format, tokenizer); called by :meth:`setup`."""

    def backend_format(self) -> Any:
        """What the local transformers backend needs of the model's format (``tokenizer``,
        ``stop_token_ids``, ``bos_in_template``): by default the chat format loaded in :meth:`prepare`."""
        return self.chat_format

    def _call(self, coro):
        """Run ``coro`` on this step's own event loop, in its own thread (safe inside a running loop)."""
        return self._thread.submit(self._loop.run_until_complete, coro).result()

    def close(self) -> None:
        if self._loop is not None:
            try:
                if self.backend is not None:
                    self._call(self.backend.close())
            finally:
                self._thread.submit(self._loop.close).result()
                self._thread.shutdown()
                self._loop = self._thread = None
        if self.counts["rows"]:
            c = self.counts
            Console(stderr=True, highlight=False).print(
                f"tag {self.name}: {c['tagged']}/{c['rows']} rows tagged by {self.model}; null: "
                f"{c['unparseable']} unparseable, {c['off_label']} off-label, {c['failed']} failed requests, "
                f"{c['no_input']} without input")

    # -- per row --------------------------------------------------------------------------------
    @abc.abstractmethod
    def prompt_for(self, row: dict[str, Any]) -> str | None:
        """The full raw prompt for ``row`` (None when the row has nothing to judge)."""

    @abc.abstractmethod
    def parse(self, text: str) -> tuple[dict[str, Any] | None, str]:
        """(columns without the generator, "tagged") or (None, "unparseable" | "off_label")."""

    def stop(self) -> tuple[str, ...]:
        return ()

    async def _ask_all(self, prompts: list[str | None]) -> list[GenerationResult | None]:
        gate = asyncio.Semaphore(self.concurrency)
        params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=self.max_new_tokens, seed=0)
        stop = self.stop()

        async def ask(prompt: str | None) -> GenerationResult | None:
            if prompt is None:
                return None
            async with gate:
                try:
                    return await self.backend.generate(GenerationRequest(prompt, params, stop, role="judge"))
                except MagpieError:
                    raise  # permanent (bad endpoint, auth): the run stops with one line
                except Exception as exc:  # noqa: BLE001 - one failed request = one null row, counted
                    return GenerationResult("", "error", 0, error=f"{type(exc).__name__}")

        return await asyncio.gather(*(ask(p) for p in prompts))

    def run(self, batch: Batch) -> Batch:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        results = self._call(self._ask_all([self.prompt_for(row) for row in rows]))
        out: dict[str, list] = {c: [] for c in self.columns}
        for result in results:
            self.counts["rows"] += 1
            values, status = None, "no_input"
            if result is not None:
                status = "failed"
                if result.finish_reason != "error":
                    values, status = self.parse(result.text)
            self.counts[status] += 1
            values = dict(values or {})
            if values:  # the model produced these columns (a raw verdict may come without a label)
                values[self.generator_column] = self.model
            for c in self.columns:
                out[c].append(values.get(c))
        return out

    def info(self) -> dict[str, Any]:
        backend = asdict(self.backend.info()) if self.backend is not None else None
        info = {**super().info(), "options": redact_mapping(self.options, drop=True), "model": self.model,
                "revision": self.revision, "backend": self.backend_name,
                "backend_info": redact_mapping(backend, drop=True), "temperature": 0.0,
                "counts": dict(self.counts)}
        return json.loads(redact(json.dumps(info, default=str)))


class JudgeStep(BackendStep):
    """A judge question about the row's ``instruction``, asked in the judge's own chat format; the answer's
    label (under one of ``label_keys``) must be one of the labels of the step's registered label column."""

    requires = ("instruction",)
    label_keys: ClassVar[tuple[str, ...]]

    @property
    def label_column(self) -> str:
        """The step's registered column that has a label set."""
        return next(c.name for c in self.outputs if c.labels)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.output(self.label_column).labels

    def prepare(self, model: str) -> None:
        with self.loading("judge", self.model):
            self.chat_format = load_chat_format(model, revision=self.revision)
        self.prefill = "{" if self.options.get("prefill", True) else ""

    def stop(self) -> tuple[str, ...]:
        # like the official tagger, stop at the closing brace of the (flat) JSON answer: a chatty judge
        # does not spend tokens on prose after it; the parser closes the object again
        return ("}", *self.chat_format.assistant_stop)

    @abc.abstractmethod
    def question(self, instruction: str) -> str:
        """The judge's user message for ``instruction``."""

    def prompt_for(self, row: dict[str, Any]) -> str | None:
        instruction = row.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            return None
        return self.chat_format.assistant_prompt([], user=self.question(instruction)) + self.prefill

    def parse(self, text: str) -> tuple[dict[str, Any] | None, str]:
        obj = extract_object(text, prefix=self.prefill)
        if obj is None:
            return None, "unparseable"
        label = normalise_label(get_key(obj, *self.label_keys), self.labels)
        if label is None:
            return None, "off_label"
        return {self.label_column: label, **self.details(obj, label)}, "tagged"

    def details(self, obj: dict, label: str) -> dict[str, Any]:
        """The step's free-text / secondary columns from the parsed answer (the label is valid)."""
        return {}


class TaskCategoryStep(JudgeStep):
    name = "task_category"
    label_keys = ("primary_tag", "task_category")

    def question(self, instruction: str) -> str:
        return classification_prompt(instruction)

    def details(self, obj: dict, label: str) -> dict[str, Any]:
        others = get_key(obj, "other_tags", "other_task_category")
        others = [others] if isinstance(others, str) else others if isinstance(others, list) else []
        found = [normalise_label(o, self.labels) for o in others]
        # off-label entries of the secondary list (e.g. the "<tag 1>" placeholder) are dropped, not guessed
        return {"other_task_category": list(dict.fromkeys(f for f in found if f is not None and f != label))}


class DifficultyStep(JudgeStep):
    name = "difficulty"
    label_keys = ("difficulty",)

    def question(self, instruction: str) -> str:
        return difficulty_prompt(instruction)

    def details(self, obj: dict, label: str) -> dict[str, Any]:
        return {"intent": free_text(get_key(obj, "intent")), "knowledge": free_text(get_key(obj, "knowledge"))}


class QualityStep(JudgeStep):
    name = "quality"
    label_keys = ("input_quality", "quality")

    def question(self, instruction: str) -> str:
        return quality_prompt(instruction)

    def details(self, obj: dict, label: str) -> dict[str, Any]:
        return {"quality_explanation": free_text(get_key(obj, "explanation", "quality_explanation"))}
