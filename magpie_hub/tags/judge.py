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
from magpie_hub.tags.judge_parse import extract_object, free_text, get_key, normalise_label

DEFAULT_JUDGE = "meta-llama/Meta-Llama-3-8B-Instruct"

_STEP_OPTIONS = {"model", "revision", "backend", "backend_options", "endpoint", "concurrency", "max_new_tokens",
                 "prefill", "batch_size"}


# The official MAGPIE judge prompts, verbatim (credit: magpie-align/magpie @
# b734a36818e4ba7ef7f0f582fc55f7e860407d26, exp/str_utils.py; used by exp/unitag.py as the user message, with
# the assistant turn pre-filled with "{", temperature 0, max_tokens 1024 and stop ["}"]). The Pro/Air
# thresholds were calibrated on labels from this wording. The task tags listed in the classification prompt
# are the labels of tags/columns.py TASK_CATEGORIES (tests/test_judge.py checks they agree).
def difficulty_prompt(input: str) -> str:  # noqa: A002 - the official argument name
    # verbatim (trailing spaces written as \x20): magpie-align/magpie@b734a36 exp/str_utils.py input_difficulty_rating()
    return f'''
# Instruction\x20

You first need to identify the given user intent and then label the difficulty level of the user query based on the content of the user query.

## User Query
```
{input}
```

## Output Format
Given the user query, in your output, you first need to identify the user intent and the knowledge needed to solve the task in the user query.
Then, rate the difficulty level of the user query as `very easy`, `easy`, `medium`, `hard`, or `very hard`.

Now, please output the user intent and difficulty level below in a json format by filling in the placeholders in []:
```
{{\x20\x20\x20
    "intent": "The user wants to [....]",
    "knowledge": "To solve this problem, the models need to know [....]",
    "difficulty": "[very easy/easy/medium/hard/very hard]"
}}
```
'''


def classification_prompt(input: str) -> str:  # noqa: A002 - the official argument name
    # verbatim: magpie-align/magpie@b734a36 exp/str_utils.py input_classification()
    return f'''
# Instruction

Please label the task tags for the user query.

## User Query
```
{input}
```

## Tagging the user input
Please label the task tags for the user query. You will need to analyze the user query and select the most relevant task tag from the list below.

all_task_tags = [
    "Information seeking",  # Users ask for specific information or facts about various topics.
    "Reasoning",  # Queries require logical thinking, problem-solving, or processing of complex ideas.
    "Planning",  # Users need assistance in creating plans or strategies for activities and projects.
    "Editing",  # Involves editing, rephrasing, proofreading, or other tasks related to the composition of general written content.
    "Coding & Debugging",  # Users seek help with writing, reviewing, or fixing code in programming.
    "Math",  # Queries related to mathematical concepts, problems, and calculations.
    "Role playing",  # Users engage in scenarios requiring ChatGPT to adopt a character or persona.
    "Data analysis",  # Requests involve interpreting data, statistics, or performing analytical tasks.
    "Creative writing",  # Users seek assistance with crafting stories, poems, or other creative texts.\x20
    "Advice seeking",  # Users ask for recommendations or guidance on various personal or professional issues.
    "Brainstorming",  # Involves generating ideas, creative thinking, or exploring possibilities.\x20
    "Others"  # Any queries that do not fit into the above categories or are of a miscellaneous nature.
]

## Output Format:
Note that you can only select a single primary tag. Other applicable tags can be added to the list of other tags.
Now, please output your tags below in a json format by filling in the placeholders in <...>:
```
{{\x20
    "primary_tag": "<primary tag>",
    "other_tags": ["<tag 1>", "<tag 2>", ... ]
}}
```
'''


def quality_prompt(input: str) -> str:  # noqa: A002 - the official argument name
    # verbatim: magpie-align/magpie@b734a36 exp/str_utils.py input_quality_rating()
    return f'''
# Instruction

You need to rate the quality of the user query based on its clarity, specificity, and coherence.

The rating scale is as follows:

- very poor: The query is unclear, vague, or incoherent. It lacks essential information and context.
- poor: The query is somewhat unclear or lacks important details. It requires significant clarification.
- average: The query is moderately clear and specific. It may require some additional information for a complete understanding.
- good: The query is clear, specific, and mostly well-formed. It provides sufficient context for understanding the user's intent.
- excellent: The query is very clear, specific, and well-articulated. It contains all the necessary information and context for providing a comprehensive response.

## User Query
```
{input}
```

## Output Format
Given the user query, you first need to give an assesement, highlighting the strengths and/or weaknesses of the user query.
Then, you need to output a rating from very poor to excellent by filling in the placeholders in [...]:
```
{{\x20\x20\x20
    "explanation": "[...]",
    "input_quality": "[very poor/poor/average/good/excellent]"
}}
```
'''



class BackendStep(TagStep):
    """A rows-scope step that sends one greedy completion per row through a generation backend and
    parses it. Subclasses give ``default_model``, :meth:`prompt_for` and :meth:`parse`."""

    default_model: ClassVar[str] = DEFAULT_JUDGE
    default_max_new_tokens: ClassVar[int] = 1024   # the official unitag.py --max_tokens
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
