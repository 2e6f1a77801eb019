"""User-facing exceptions, and the one policy of what counts as a secret.

Every error a user can cause is a :class:`MagpieError`: the CLI prints ``error: <message>`` on one line
and exits with ``exit_code`` (2 for bad input). Messages name the fix. Secrets never appear in them: every
message goes through :func:`redact`.

Secrets, defined once here and used by every stage that writes text or records settings:

- a *secret value* in text: a Hub token (``hf_...``), an API key (``sk-...``), the value after ``Bearer``,
  and the value of any secret read through :func:`read_secret` (``HF_TOKEN``, ``OPENAI_API_KEY``, ...),
  from the environment or ``./.env``; :func:`redact` replaces them;
- a *secret key* in a mapping (recipe options, step options, backend info): a name containing one of
  :data:`SECRET_KEY_WORDS` (``token``, ``api_key``, ``Authorization``, ``password``, ...), except token
  counts (``max_new_tokens``, ``generated_tokens``); :func:`redact_mapping` masks or drops them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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


# -- secrets ------------------------------------------------------------------------------------------------
SECRET_KEY_WORDS = ("token", "key", "secret", "password", "auth")
"""A mapping key containing one of these words (any case) holds a secret: ``hf_token``, ``api_key``,
``Authorization``, ``auth_header``, ``password``, ``client_secret``."""

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
"""Environment variables whose values are secrets wherever they appear."""

MASK = "***"
_TOKEN_COUNT = re.compile(r"tokens$", re.IGNORECASE)   # max_new_tokens, generated_tokens: counts, not secrets
_SECRET_TEXT = (
    (re.compile(r"hf_[A-Za-z0-9]{8,}"), "hf_***"),                                  # Hub tokens
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), "sk-***"),                              # OpenAI-style API keys
    (re.compile(r"(\bBearer\s+)[^\s\"',;}]+", re.IGNORECASE), r"\g<1>***"),         # Authorization values
)
_read_secrets: set[str] = set()                        # values handed out by read_secret()


def is_secret_key(name: object) -> bool:
    """True when a mapping key names a secret (see :data:`SECRET_KEY_WORDS`)."""
    text = str(name).lower()
    return any(word in text for word in SECRET_KEY_WORDS) and not _TOKEN_COUNT.search(text)


def redact(text: str) -> str:
    """``text`` with every secret value replaced (known secret values, then the secret shapes)."""
    known = {os.environ.get(name) for name in SECRET_ENV} | _read_secrets
    for value in sorted((v for v in known if v and len(v) >= 4), key=len, reverse=True):
        text = text.replace(value, MASK)
    for pattern, mask in _SECRET_TEXT:
        text = pattern.sub(mask, text)
    return text


def has_secret(text: str) -> bool:
    """True when ``text`` holds a secret value (:func:`redact` would change it)."""
    return redact(text) != text


def redact_mapping(value: Any, *, drop: bool = False) -> Any:
    """``value`` (JSON-like) with secret keys masked as ``***`` (``drop=True``: removed) and secret values
    redacted in every string, at any depth: for manifests, cards and step records."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not is_secret_key(key):
                out[key] = redact_mapping(item, drop=drop)
            elif not drop:
                out[key] = MASK
        return out
    if isinstance(value, (list, tuple)):
        return [redact_mapping(item, drop=drop) for item in value]
    if isinstance(value, str):
        return redact(value)
    return value


def env_file_values(path: str | Path = ".env") -> dict[str, str]:
    """The variables of ``./.env`` (python-dotenv syntax); empty when there is no such file."""
    if not Path(path).is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def read_secret(*names: str) -> str | None:
    """The first of ``names`` set in the environment, else in ``./.env``; None when none is. The value is
    remembered, so :func:`redact` hides it wherever it would appear."""
    found = next((os.environ[n] for n in names if os.environ.get(n)), None)
    if not found:
        values = env_file_values()
        found = next((values[n] for n in names if values.get(n)), None)
    register_secret(found)
    return found or None


def register_secret(value: str | None) -> None:
    """Have :func:`redact` hide ``value`` from now on (a token given in options rather than read here)."""
    if value:
        _read_secrets.update({value, value.strip()})
