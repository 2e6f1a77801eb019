"""Models by reference: resolve a reference to something loadable, load tokenizers, read generation eos ids.

A *reference* is what a recipe or option names: a Hub id, a local folder, or an alias (``tiny:llama3``)
whose scheme an edge module registered with :func:`register_scheme`. This module knows no alias itself:
the demo models (:mod:`magpie_hub.chat.demo_models`) register ``tiny:`` when the CLI / pipeline import them,
so stages, backends and the chat format depend only on this module, never on demo-model code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.constants import is_offline_mode
from transformers import AutoTokenizer

from magpie_hub.errors import ModelError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model", "tokenizer.tiktoken", "qwen.tiktoken")

_SCHEMES: list[tuple[Callable[[str], bool], Callable[[str], str]]] = []


def register_scheme(match: str | Callable[[str], bool], resolver: Callable[[str], str]) -> None:
    """Make references that start with ``match`` (e.g. ``"tiny:"``), or for which ``match(ref)`` is true,
    resolve through ``resolver(ref) -> path``."""
    test = (lambda ref, prefix=match: ref.startswith(prefix)) if isinstance(match, str) else match
    _SCHEMES.append((test, resolver))


def resolve_model(ref: str) -> str:
    """A reference -> a local folder or Hub id (unchanged when no registered scheme matches)."""
    if isinstance(ref, str):
        for test, resolver in _SCHEMES:
            if test(ref):
                return resolver(ref)
    return ref


def local_dir(name: str) -> Path | None:
    """The local directory ``name`` refers to, None for a Hub id; ModelError for a bad path."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{name} is a file, not a model directory: pass the folder that holds "
                             "tokenizer_config.json")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or not HUB_ID.match(name):
        raise ModelError(f"model directory {name} does not exist: pass an existing folder or a Hub model id")
    return None


def no_vocabulary(name) -> ModelError:
    return ModelError(f"{name} has no tokenizer vocabulary (tokenizer.json, tokenizer.model or vocab.json): "
                      "copy the model's tokenizer files into it")


def load_auto_tokenizer(name: str, revision: str | None):
    local = local_dir(name)
    if local is not None:
        has_config = any((local / f).is_file() for f in ("tokenizer_config.json", *VOCAB_FILES))
        if not has_config:
            raise ModelError(f"{name} holds no tokenizer (no tokenizer_config.json / tokenizer.json): pass the "
                             "model folder itself")
        try:
            return AutoTokenizer.from_pretrained(str(local))
        except Exception as exc:  # transformers raises ValueError/OSError/KeyError for broken folders
            if not any((local / f).is_file() for f in VOCAB_FILES):
                raise no_vocabulary(name) from None
            raise ModelError(f"cannot load the tokenizer in {name} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160]}): check the folder's tokenizer files") from None
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision)
    except Exception as exc:
        if is_offline_mode():
            raise ModelError(f"{name} is not a local folder and not in the Hub cache while HF_HUB_OFFLINE=1: "
                             f"download it first (hf download {name}) or pass a local directory") from None
        raise ModelError(f"cannot load the tokenizer of Hub model {name} ({type(exc).__name__}): check the id, "
                         "the --revision and HF_TOKEN for gated models") from None


def has_vocabulary(tok) -> bool:
    """False for a tokenizer that only holds added tokens (a config-only folder loads that way)."""
    return len(tok) - len(tok.added_tokens_decoder) > 0


def load_tokenizer(model_or_dir: str, revision: str | None = None):
    """Load a tokenizer with a usable vocabulary (registered references are resolved first); ModelError otherwise."""
    name = resolve_model(str(model_or_dir))
    tok = load_auto_tokenizer(name, revision)
    if not has_vocabulary(tok):
        raise no_vocabulary(model_or_dir)
    return tok


def generation_eos_ids(name: str, revision: str | None) -> tuple[int, ...]:
    """eos ids of generation_config.json from the folder or the Hub cache (never downloaded)."""
    path: Path | None = None
    local = Path(name).expanduser()
    if local.is_dir():
        path = local / "generation_config.json"
    else:
        found = try_to_load_from_cache(name, "generation_config.json", revision=revision)
        path = Path(found) if isinstance(found, str) else None
    if path is None or not path.is_file():
        return ()
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        raise ModelError(f"{path} is not valid JSON: fix or delete it") from None
    eos = eos if isinstance(eos, list) else [eos]
    return tuple(int(i) for i in eos if isinstance(i, int))


