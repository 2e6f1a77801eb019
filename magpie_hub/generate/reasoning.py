"""Reasoning blocks in responses (``<think>...</think>``): the tags, derived from a chat template, and the
split of a response into (reasoning, answer).

Reasoning models (QwQ, DeepSeek-R1 distills, Skywork-o1, Qwen3) write their reasoning between tags before
the answer; their chat templates show the tags (they strip the block from the history, or open it in the
generation prompt). :func:`think_tags` reads the tags from the template text; :func:`split_reasoning`
splits a response, also when the generation prompt already opened the block (the text then holds only the
closing tag, as DeepSeek-R1 distills write).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# tag names reasoning templates use, most common first
_NAMES = ("think", "thinking", "reasoning", "thought")
_TAG_RE = re.compile(r"<(/?)(" + "|".join(_NAMES) + r")>")


@dataclass(frozen=True)
class ThinkTags:
    open: str
    close: str

    def as_dict(self) -> dict[str, str]:
        return {"open": self.open, "close": self.close}


DEFAULT_TAGS = ThinkTags("<think>", "</think>")


def think_tags(chat_template: str | None) -> ThinkTags | None:
    """The reasoning tags a chat template shows (both the opening and the closing tag), else None."""
    if not chat_template:
        return None
    seen = {(bool(m.group(1)), m.group(2)) for m in _TAG_RE.finditer(chat_template)}
    for name in _NAMES:
        if (False, name) in seen and (True, name) in seen:
            return ThinkTags(f"<{name}>", f"</{name}>")
    return None


def opens_block(prompt_tail: str, tags: ThinkTags) -> bool:
    """Whether a generation prompt ends inside an opened reasoning block."""
    tail = prompt_tail.rstrip()
    return tail.endswith(tags.open)


def split_reasoning(text: str, tags: ThinkTags) -> tuple[str | None, str]:
    """(reasoning or None, answer). A block at the start (``<think>R</think>A``) or a lone closing tag
    (the prompt opened the block: ``R</think>A``) is split off; anything else is all answer."""
    stripped = text.lstrip()
    if stripped.startswith(tags.open):
        body = stripped[len(tags.open):]
        head, sep, rest = body.partition(tags.close)
        if not sep:           # opened, never closed (cut at max_new_tokens): all reasoning, no answer
            return head.strip(), ""
        return head.strip(), rest.strip()
    if tags.close in text and tags.open not in text:
        head, _, rest = text.partition(tags.close)
        return head.strip(), rest.strip()
    return None, text


__all__ = ["DEFAULT_TAGS", "ThinkTags", "opens_block", "split_reasoning", "think_tags"]
