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

import errno
import functools
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


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


class RemoteUnavailableError(BackendError):
    """A generation server failed every request over the fail-fast window (after retries): exit code 1,
    as any failing remote; the finished rows stay in the checkpoint for a resume."""

    exit_code = 1


class LockedError(MagpieError):
    """Another process is writing the dataset directory (its lock names the holder)."""


class FileSystemError(MagpieError):
    """Disk full, permission denied, a path removed meanwhile: one line naming the path and the fix."""


def os_error(exc: OSError, what: str) -> MagpieError:
    """An ``OSError`` met while ``what`` (e.g. "cannot tag data/demo") as one line naming the path and the fix
    (pyarrow's I/O errors are OSErrors without errno: their text is used)."""
    if isinstance(exc, MagpieError):
        return exc
    path = exc.filename or ""
    where = f" {path}" if path else ""
    reason = exc.strerror or " ".join(str(exc).split())[:160] or type(exc).__name__
    code = exc.errno or (errno.ENOSPC if "No space left" in str(exc) else
                         errno.EACCES if "Permission denied" in str(exc) else None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space (or choose another --out) and re-run the same command: finished work is kept"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"give this user read and write access to{where or ' the directory'} (or choose another path) and re-run"
    elif code == errno.ENOENT:
        fix = "check the path exists (it may have been removed while the command ran) and re-run"
    else:
        fix = "check the path and the disk, then re-run the same command"
    return FileSystemError(f"{what}: {reason}{':' + where if where else ''}", hint=fix)


def os_errors(command: str, target: str) -> Callable[[F], F]:
    """Decorator for a pipeline entry point: an ``OSError`` escaping it becomes one :func:`os_error` line
    naming the keyword argument ``target`` (else the first argument), e.g. the dataset directory."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except OSError as exc:
                where = kwargs.get(target) or (args[0] if args else "")
                raise os_error(exc, f"cannot {command} {where}".rstrip()) from None
        return inner  # type: ignore[return-value]
    return wrap


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
    (re.compile(r"(\bBearer\s+)[^\s\"',;}\]]+", re.IGNORECASE), r"\g<1>***"),       # Authorization values
    # any Authorization / api-key / token header or field echoed back by a server (``Authorization=X``,
    # ``"authorization": "X"``, ``x-api-key: X``, ``?token=X``), whatever the value looks like
    (re.compile(r"((?:proxy-)?authorization|x-api-key|api[_-]?key|(?:hf|api|access|auth)[_-]?token|[?&]token)"
                r"([\"']?\s*[:=]\s*[\"']?)(?!\*\*\*)((?:Bearer|Basic)\s+)?[^\s\"',;}&\]]+",
                re.IGNORECASE), r"\g<1>\g<2>\g<3>***"),
)
_read_secrets: set[str] = set()                        # values handed out by read_secret()
_login_checked = False


def is_secret_key(name: object) -> bool:
    """True when a mapping key names a secret (see :data:`SECRET_KEY_WORDS`)."""
    text = str(name).lower()
    return any(word in text for word in SECRET_KEY_WORDS) and not _TOKEN_COUNT.search(text)


def login_token_path() -> Path:
    """Where ``hf auth login`` stores the Hub token (huggingface_hub's rule, without importing it)."""
    if os.environ.get("HF_TOKEN_PATH"):
        return Path(os.environ["HF_TOKEN_PATH"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "token"


def _register_known_sources() -> None:
    """Once per process: the login token file and the secret-named variables of ``./.env`` are secrets,
    whatever their shape (a login token need not start with ``hf_``)."""
    global _login_checked
    if _login_checked:
        return
    _login_checked = True
    try:
        register_secret(login_token_path().read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        pass
    try:
        for name, value in env_file_values().items():
            if is_secret_key(name) or name in SECRET_ENV:
                register_secret(value)
    except Exception:  # noqa: BLE001 - a malformed .env is reported where it is read, not while redacting
        pass


def known_secrets() -> set[str]:
    """Every secret value this process knows: the secret environment variables (any name holding a
    secret word, e.g. ``OPENAI_API_KEY``, ``MY_SERVICE_TOKEN``), the values read or registered, ``./.env``'s
    secret variables and the ``hf auth login`` token."""
    _register_known_sources()
    named = {os.environ.get(name) for name in SECRET_ENV} | _read_secrets
    other = {v for k, v in os.environ.items()
             if is_secret_key(k) and not k.endswith(("_PATH", "_FILE", "_SOCK")) and not k.startswith("HF_HUB_")}
    return {v for v in named if v and len(v.strip()) >= 4} | {v for v in other if v and len(v.strip()) >= 8}


def redact(text: str) -> str:
    """``text`` with every secret value replaced (known secret values, then the secret shapes)."""
    known = known_secrets()
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
    if value and isinstance(value, str):
        _read_secrets.update({value, value.strip()})


def register_secrets_in(options: Any) -> None:
    """Register every value under a secret key of ``options`` (recipe options, step options), any depth."""
    if isinstance(options, Mapping):
        for key, item in options.items():
            if is_secret_key(key) and isinstance(item, str):
                register_secret(item)
            else:
                register_secrets_in(item)
    elif isinstance(options, (list, tuple)):
        for item in options:
            register_secrets_in(item)


class _RedactedRecord(logging.LogRecord):
    def getMessage(self) -> str:  # noqa: N802 - logging's API
        return redact(super().getMessage())


def install_log_redaction() -> None:
    """Every log record (ours, huggingface_hub's, httpx's) is redacted when it is formatted."""
    logging.setLogRecordFactory(_RedactedRecord)
