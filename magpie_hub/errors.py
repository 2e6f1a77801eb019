"""One module of user-facing exceptions.

Every error a user can cause is a :class:`MagpieError`: the CLI prints ``error: <message>`` on one line
and exits with ``exit_code`` (2 for bad input). Messages name the fix. Secrets never appear in them:
construct messages through :func:`redact` when they may contain text from the environment or HTTP.
"""

from __future__ import annotations

import os
import re


class MagpieError(Exception):
    """A failure the user can fix; printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        text = message if hint is None else f"{message} ({hint})"
        super().__init__(redact(" ".join(text.split())))


class RecipeError(MagpieError):
    """The recipe file or a command-line override is invalid."""


class ModelError(MagpieError):
    """The model/tokenizer cannot be loaded or has no usable chat template."""


class ChatFormatError(MagpieError):
    """The chat template cannot produce what MAGPIE needs (e.g. it forbids a system prompt)."""


class DatasetDirError(MagpieError):
    """A dataset directory is missing, malformed, or lacks expected columns."""


class BackendError(MagpieError):
    """A generation backend failed in a way retries cannot fix (bad endpoint, token, model)."""


class HubError(MagpieError):
    """A Hub operation failed permanently (auth, not found, conflict)."""


_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


def redact(text: str) -> str:
    """Remove Hub tokens (the HF_TOKEN value and anything shaped like ``hf_...``) from ``text``."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token and len(token) >= 4:
        text = text.replace(token, "***")
    return _TOKEN_RE.sub("hf_***", text)
