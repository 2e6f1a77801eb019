"""The official MAGPIE pre-query strings per model family, and the recipe's choice between them and the
strings derived from the model's own template (:mod:`magpie_hub.chat.format`).

Source (credited; strings copied verbatim, JSON-unescaped): magpie-align/magpie @
b734a36818e4ba7ef7f0f582fc55f7e860407d26, ``configs/model_configs.json`` (``pre_query_template`` of each
model entry), used as-is by ``exp/gen_ins.py`` (``llm.generate(pre_query_template, ...)``). Deriving from the
template stays the default: several of these hand-written strings are not what the model's template renders
(a space after ``<s>``, ``\\n\\n`` after Gemma-2's header, no injected system block for Llama-3.1/3.3 and
Qwen2). ``official`` exists to reproduce the released datasets; see ``docs/fidelity.md`` per family.

A recipe's ``pre_query`` (recipe-wide or per config) is one of:

* ``derived`` (default): the template's own rendering, including any default system block it injects;
* ``official``: this table's string for the model's family (recognised from the model reference), or
  ``official:FAMILY`` to name the family;
* any other text: used verbatim as the first instruction's prompt.

``drop_default_system: true`` removes the default system block a template injects (Qwen2, Qwen2.5, the
Llama-3.1+ date block) from the *derived* pre-query. Both settings only change the prompt of the first
instruction without a system prompt: responses and follow-up turns are rendered through the template, as
the official ``gen_res.py`` / ``gen_mt.py`` do (``apply_chat_template``).
"""

from __future__ import annotations

import re

from magpie_hub.errors import RecipeError

OFFICIAL_SOURCE = ("magpie-align/magpie@b734a36818e4ba7ef7f0f582fc55f7e860407d26 "
                   "configs/model_configs.json (pre_query_template)")

_LLAMA3 = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
_INST = "<s> [INST] "

# family -> (official pre_query_template, the model_configs.json entries it is copied from)
OFFICIAL_PRE_QUERY: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama-3": (_LLAMA3, ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-70B-Instruct")),
    "llama-3.1": (_LLAMA3, ("meta-llama/Meta-Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-70B-Instruct",
                            "meta-llama/Meta-Llama-3.1-405B-Instruct", "meta-llama/Llama-3.3-70B-Instruct")),
    "qwen2": ("<|im_start|>user\n", ("Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2-72B-Instruct", "Qwen/Qwen2-1.5B-Instruct",
                                     "Qwen/Qwen2-Math-7B-Instruct", "Qwen/Qwen1.5-7B-Chat")),
    "qwen2.5": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n", ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-72B-Instruct",
                                       "Qwen/Qwen2.5-Coder-7B-Instruct", "Qwen/Qwen2.5-Math-72B-Instruct")),
    "gemma-1.1": ("<bos><start_of_turn>user\n", ("google/gemma-1.1-7b-it",)),
    "gemma-2": ("<bos><start_of_turn>user\n\n", ("google/gemma-2-9b-it", "google/gemma-2-27b-it",
                                                 "google/gemma-2-2b-it")),
    "phi-3": ("<s> <|user|>\n", ("microsoft/Phi-3-mini-128k-instruct", "microsoft/Phi-3-medium-128k-instruct",
                                 "microsoft/Phi-3.5-mini-instruct")),
    "phi-3-small": ("<|endoftext|><|user|>\n", ("microsoft/Phi-3-small-128k-instruct",)),
    "mistral": (_INST, ("mistralai/Mistral-7B-Instruct-v0.3",)),
    "llama-2": (_INST, ("meta-llama/Llama-2-7b-chat-hf",)),
    "yi-1.5": ("<|startoftext|><|im_start|>user\n", ("01-ai/Yi-1.5-34B-Chat",)),
    "vicuna": ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions.\n\nUSER: ", ("lmsys/vicuna-7b-v1.5",)),
    "deepseek-coder-v2": ("<｜begin▁of▁sentence｜>User: ", ("deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct",)),
}

# model reference (lower case) -> family; the first match wins, so the specific patterns come first
_FAMILY_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"llama-?3\.[123]", "llama-3.1"), (r"llama-?3", "llama-3"), (r"llama-?2", "llama-2"),
    (r"qwen-?2\.5", "qwen2.5"), (r"qwen-?(2|1\.5)", "qwen2"),
    (r"gemma-?2", "gemma-2"), (r"gemma-?(1\.1|7b)", "gemma-1.1"),
    (r"phi-?3(\.5)?-small", "phi-3-small"), (r"phi-?3", "phi-3"),
    (r"mistral-7b-instruct", "mistral"), (r"yi-1\.5", "yi-1.5"), (r"vicuna", "vicuna"),
    (r"deepseek-coder-v2", "deepseek-coder-v2"),
)

DERIVED, OFFICIAL = "derived", "official"


def official_family(model: str) -> str | None:
    """The official table's family of a model reference (Hub id, folder, ``tiny:llama3``), or None."""
    name = str(model).lower()
    return next((family for pattern, family in _FAMILY_PATTERNS if re.search(pattern, name)), None)


def official_pre_query(model: str, family: str | None = None) -> str:
    """The official pre-query string of ``family`` (or of the model's recognised family)."""
    family = family or official_family(model)
    if family is None:
        raise RecipeError(f"pre_query: official: no official MAGPIE pre-query is known for {model!r}",
                          hint=f"name the family (pre_query: official:FAMILY, one of {', '.join(OFFICIAL_PRE_QUERY)}), "
                               "give the text, or use pre_query: derived")
    if family not in OFFICIAL_PRE_QUERY:
        raise RecipeError(f"pre_query: official:{family}: unknown family",
                          hint=f"use one of {', '.join(OFFICIAL_PRE_QUERY)}")
    return OFFICIAL_PRE_QUERY[family][0]


def resolve_pre_query(chat_format, setting: str | None = DERIVED, *, model: str = "",
                      drop_default_system: bool = False) -> str | None:
    """The first instruction's prompt for a recipe ``pre_query`` setting; None = the derived one unchanged.

    ``derived`` (+ ``drop_default_system``): the template's pre-query, without its injected system block;
    ``official`` / ``official:FAMILY``: the table above; anything else: that text."""
    setting = DERIVED if setting is None else setting
    if setting == DERIVED:
        return chat_format.pre_query_without_default_system() if drop_default_system else None
    if setting == OFFICIAL or setting.startswith(OFFICIAL + ":"):
        family = setting.partition(":")[2].strip() or None
        return official_pre_query(model or chat_format.model, family)
    if not setting:
        raise RecipeError("pre_query is empty", hint="use derived, official, official:FAMILY or the text")
    return setting


__all__ = ["DERIVED", "OFFICIAL", "OFFICIAL_PRE_QUERY", "OFFICIAL_SOURCE", "official_family",
           "official_pre_query", "resolve_pre_query"]
