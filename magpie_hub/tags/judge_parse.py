"""Robust extraction of the JSON object an LLM judge was asked for, and strict label normalisation.

Judges wrap JSON in code fences, add prose before or after it, use single quotes or trailing commas,
change the case of labels, or stop right before the closing brace (the official tagger stops at ``}``).
:func:`extract_object` finds the first JSON object that parses under those variations; it returns
``None`` when there is none (never raises). :func:`normalise_label` maps an answer onto a fixed label
set by case, whitespace and surrounding punctuation only — an answer that is not one of the labels
is off-label (``None``): nothing is guessed.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON|python)?[ \t]*\n?(.*?)(?:```|$)", re.S)
_TRAILING_COMMA_RE = re.compile(r",(\s*[}\]])")
_STRIP_CHARS = " \t\r\n\"'`[]<>().,;:*"


def _balanced_objects(text: str) -> Iterator[str]:
    """Every ``{...}`` substring with balanced braces (string-literal aware), in order of start; an
    object still open at the end of the text is yielded closed (a judge stopped at ``}``)."""
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        depth, quote, escaped = 0, None, False
        for pos in range(start, len(text)):
            ch = text[pos]
            if quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    quote = None
                continue
            if ch in "\"'":
                # an apostrophe inside a bare word (e.g. user's) is not a quote
                if ch == "'" and pos > 0 and text[pos - 1].isalnum():
                    continue
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    yield text[start:pos + 1]
                    break
        else:
            tail = text[start:].rstrip()
            yield tail + "}" * max(depth, 1) if not quote else tail + quote + "}" * max(depth, 1)


def _loads(candidate: str) -> dict | None:
    for text in (candidate, _TRAILING_COMMA_RE.sub(r"\1", candidate)):
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            pass
        else:
            return value if isinstance(value, dict) else None
        try:  # single quotes, True/False/None: a Python literal (never evaluated as code)
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def extract_object(text: str | None, *, prefix: str = "") -> dict | None:
    """The first JSON object in ``prefix + text`` (``prefix`` = what the prompt pre-filled, e.g. ``{``),
    or ``None``. Code fences are looked into first, then the whole text."""
    if not text and not prefix:
        return None
    full = prefix + (text or "")
    sources = [m.group(1) for m in _FENCE_RE.finditer(full)] + [full]
    if prefix:
        sources.append(text or "")  # the model repeated the prefilled brace itself
    for source in sources:
        for candidate in _balanced_objects(source):
            value = _loads(candidate)
            if value is not None:
                return value
    return None


def get_key(obj: Mapping[str, Any], *names: str) -> Any:
    """``obj[name]`` for the first of ``names`` present, matching keys case- and separator-insensitively."""
    folded = {_fold_key(k): v for k, v in obj.items() if isinstance(k, str)}
    for name in names:
        if _fold_key(name) in folded:
            return folded[_fold_key(name)]
    return None


def _fold_key(key: str) -> str:
    return re.sub(r"[\s_\-]+", "", key).lower()


def _fold_label(value: str) -> str:
    return " ".join(value.strip(_STRIP_CHARS).split()).lower()


def normalise_label(value: Any, labels: Iterable[str]) -> str | None:
    """The canonical label that ``value`` spells (ignoring case, inner whitespace runs and surrounding
    quotes/brackets/punctuation), or ``None`` when it is not one of ``labels``."""
    if not isinstance(value, str):
        return None
    folded = _fold_label(value)
    for label in labels:
        if _fold_label(label) == folded:
            return label
    return None


def free_text(value: Any, *, limit: int = 4000) -> str | None:
    """A non-empty string field (intent, knowledge, explanation), stripped and bounded; else ``None``."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value[:limit] if value else None
