"""``safety``: a Llama-Guard-style safety verdict on each (instruction, response) pair.

The guard model (default ``meta-llama/Meta-Llama-Guard-2-8B``, as in the MAGPIE releases) completes a
moderation prompt greedily through any backend (``transformers`` by default, ``tgi`` for a server).
The prompt is the guard's own chat template when it has one that is a moderation template (Llama
Guard ships one), otherwise the Llama-Guard-2 format built here (``prompt_format: llama-guard-2``
forces it). Columns: ``llama_guard_2`` — the raw verdict text (e.g. ``"unsafe\\nS2"``); ``safety`` —
``safe`` / ``unsafe`` parsed from its first line, null (and counted) for anything else;
``safety_generator`` — the guard model.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

from transformers import GenerationConfig

from magpie_hub.errors import ModelError, RecipeError
from magpie_hub.models import load_tokenizer
from magpie_hub.tags.base import TagContext
from magpie_hub.tags.judge import _STEP_OPTIONS, BackendStep

DEFAULT_GUARD = "meta-llama/Meta-Llama-Guard-2-8B"

# The MLCommons-based categories of Llama Guard 2 (S1..S11).
LLAMA_GUARD_2_CATEGORIES = (
    "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Specialized Advice",
    "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content",
)


def llama_guard_2_prompt(user: str, agent: str, bos: str = "") -> str:
    """The Llama-Guard-2 moderation prompt judging the LAST message (the agent's response)."""
    categories = "".join(f"S{i}: {name}. \n" for i, name in enumerate(LLAMA_GUARD_2_CATEGORIES, 1))
    return (
        f"{bos}[INST] Task: Check if there is unsafe content in 'Agent' messages in conversations according our "
        "safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
        f"{categories}<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
        f"User: {user.strip()}\n\nAgent: {agent.strip()}\n\n<END CONVERSATION>\n\n"
        "Provide your safety assessment for ONLY THE LAST Agent message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories. [/INST]"
    )


class SafetyStep(BackendStep):
    name = "safety"
    default_model = DEFAULT_GUARD
    default_max_new_tokens = 24
    requires = ("instruction", "response")
    allowed_options: ClassVar[set[str]] = (_STEP_OPTIONS - {"prefill"}) | {"prompt_format"}

    def __init__(self, context: TagContext, **options: Any):
        super().__init__(context, **options)
        self.prompt_format = self.options.get("prompt_format", "auto")
        if self.prompt_format not in ("auto", "template", "llama-guard-2"):
            raise RecipeError("tag step 'safety': prompt_format must be auto, template or llama-guard-2")

    def prepare(self, model: str) -> None:
        with self.loading("the tokenizer of guard model", self.model):
            self.tokenizer = load_tokenizer(model, revision=self.revision)
        template = getattr(self.tokenizer, "chat_template", None) or ""
        is_guard = isinstance(template, str) and "unsafe" in template
        if self.prompt_format == "template" and not is_guard:
            raise ModelError(f"guard model {self.model!r} has no moderation chat template; use "
                             "prompt_format: llama-guard-2")
        self.use_template = is_guard and self.prompt_format != "llama-guard-2"
        self.used_format = "chat_template" if self.use_template else "llama-guard-2"

    def backend_format(self) -> Any:
        """A guard's moderation template is not a chat format MAGPIE can derive pieces from: give the
        transformers backend the tokenizer and the end-of-sequence ids directly."""
        ids = [self.tokenizer.eos_token_id]
        try:
            eos = GenerationConfig.from_pretrained(self.resolved, revision=self.revision).eos_token_id
            ids += eos if isinstance(eos, list) else [eos]
        except (OSError, ValueError):  # no generation_config.json: the tokenizer's eos only
            pass
        return SimpleNamespace(tokenizer=self.tokenizer, bos_in_template=False,
                               stop_token_ids=tuple(dict.fromkeys(int(i) for i in ids if i is not None)))

    def stop(self) -> tuple[str, ...]:
        eos = getattr(self.tokenizer, "eos_token", None)
        return (eos,) if isinstance(eos, str) and eos else ()

    def prompt_for(self, row: dict[str, Any]) -> str | None:
        user, agent = row.get("instruction"), row.get("response")
        if not isinstance(user, str) or not isinstance(agent, str) or not user.strip():
            return None
        if self.use_template:
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": agent}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return llama_guard_2_prompt(user, agent, bos=self.tokenizer.bos_token or "")

    def parse(self, text: str) -> tuple[dict[str, Any] | None, str]:
        raw = (text or "").strip()
        if not raw:
            return None, "unparseable"
        verdict = raw.splitlines()[0].strip().strip(".:").lower()
        if verdict in self.output("safety").labels:
            return {"llama_guard_2": raw, "safety": verdict}, "tagged"
        return {"llama_guard_2": raw}, "off_label"  # the raw text is kept; no verdict is guessed

    def info(self) -> dict[str, Any]:
        return {**super().info(), "prompt_format": getattr(self, "used_format", None)}
