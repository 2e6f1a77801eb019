"""A scripted backend: answers come from a JSONL file instead of a model.

Use it to replay recorded answers of a judge (or any model) deterministically, e.g. to re-run tag
parsing on saved outputs, or to test how a pipeline treats malformed answers. ``backend_options``:

- ``answers`` (required): path of a JSONL file, one object per line::

      {"match": "Capital of France", "text": "{\\"primary_tag\\": \\"Information seeking\\"}"}
      {"text": "not json at all", "finish_reason": "length"}

  ``text`` is the completion; ``finish_reason`` is ``stop`` (default), ``length`` or ``error``.
  A line with ``match`` answers every prompt that contains that string (the first matching line wins);
  lines without ``match`` answer the other prompts in turn, cycling in file order (deterministic for
  requests issued in a fixed order). A prompt that nothing answers gets ``finish_reason="error"``.
- ``delay_ms``: sleep per request (to exercise concurrency); ``max_concurrency``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from pydantic import field_validator, model_validator

from magpie_hub.errors import RecipeError
from magpie_hub.generate.backends.base import (
    Backend,
    BackendInfo,
    BackendOptions,
    GenerationRequest,
    GenerationResult,
    cut_at_stop,
)

_FINISH = ("stop", "length", "error")


def _load_answers(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read the scripted answers file {path} ({exc.__class__.__name__}); set "
                          "backend_options.answers to a UTF-8 JSONL file") from None
    answers = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise RecipeError(f"{path}:{number} is not a JSON object; write one {{\"text\": ...}} per line") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise RecipeError(f"{path}:{number} needs a string \"text\" field")
        if item.get("finish_reason", "stop") not in _FINISH:
            raise RecipeError(f"{path}:{number}: finish_reason must be one of {', '.join(_FINISH)}")
        if "match" in item and (not isinstance(item["match"], str) or not item["match"]):
            raise RecipeError(f"{path}:{number}: \"match\" must be a non-empty string")
        answers.append(item)
    if not answers:
        raise RecipeError(f"the scripted answers file {path} is empty; add one JSON line per answer")
    return answers


class ScriptedOptions(BackendOptions):
    answers: str | None = None            # required; checked below for a message that names the fix
    delay_ms: float = 0.0
    max_concurrency: int | None = None

    @field_validator("answers", mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _answers_given(self) -> ScriptedOptions:
        if not self.answers:
            raise ValueError("the scripted backend needs backend_options.answers: the path of a JSONL file of "
                             "answers")
        return self


class ScriptedBackend(Backend):
    """Completions read from a JSONL file (see the module docstring)."""

    name = "scripted"
    Options = ScriptedOptions

    def __init__(self, model: str, *, revision: str | None = None, **options):
        opts = self.parse_options(options)
        self.model, self.revision = model, revision
        self.path = Path(opts.answers)
        self.answers = _load_answers(self.path)
        self.matched = [a for a in self.answers if "match" in a]
        self.cycle = [a for a in self.answers if "match" not in a]
        self.delay = float(opts.delay_ms) / 1000.0
        self.max_concurrency = opts.max_concurrency
        self.requests = 0
        self._next = 0

    def _pick(self, prompt: str) -> dict | None:
        for item in self.matched:
            if item["match"] in prompt:
                return item
        if not self.cycle:
            return None
        item = self.cycle[self._next % len(self.cycle)]
        self._next += 1
        return item

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests += 1
        item = self._pick(request.prompt)  # picked before any await: request order = answer order
        if self.delay:
            await asyncio.sleep(self.delay)
        if item is None:
            return GenerationResult("", "error", 0, error="no scripted answer matches this prompt")
        text, finish = item["text"], item.get("finish_reason", "stop")
        if finish == "stop":
            text, _ = cut_at_stop(text, request.stop)
        return GenerationResult(text, finish, len(text.split()),
                                error="scripted error" if finish == "error" else None)

    def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, model_id=self.model, model_revision=self.revision,
                           max_concurrency=self.max_concurrency, extra={"answers": str(self.path)})
