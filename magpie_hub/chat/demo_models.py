"""Seeded random-weight tiny chat models, built offline in seconds: the embedded default and test models.

* ``"llama3"``: a byte-level BPE trained here (``tokenizers``) on ``data/tiny_corpus.txt``, Llama-3's
  special tokens, and a Llama-3-format chat template written for this package
  (``data/llama3_chat_template.jinja``; Meta's file is under Meta's licence and does not ship). With
  ``chat_template_from=DIR`` the template is read from DIR (e.g. the real Llama-3 tokenizer_config.json).
* ``"qwen2.5"``: the real tokenizer and chat template from ``tokenizer_from=DIR``.

The weights are random (the text is gibberish), but the logit of the end-of-turn token is calibrated so
that sampled turns (temperature 1, no top-k) end by themselves after about ``TURN_TOKENS`` tokens. Models
are cached under ``$MAGPIE_HUB_CACHE/tiny-models`` (default ``~/.cache/magpie-hub``), keyed by family,
options, seed and the hashes of every source file, and built in a temporary folder renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from magpie_hub.chat.config_tokenizer import BPE_VOCAB, fast_tokenizer, package_data, read_chat_template
from magpie_hub.chat.format import ChatFormat
from magpie_hub.errors import ModelError
from magpie_hub.models import generation_eos_ids, load_tokenizer, register_scheme

BUILD_VERSION = 2
TURN_TOKENS = 48  # target mean length of a sampled turn
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 256
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                   "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_4|>", "<|eot_id|>")
LLAMA3_VOCAB = BPE_VOCAB
LOGIT_STD = 1.5  # spread of the random logits: P(end of turn) then varies little with the context
QWEN_TOKENIZER_ENV = "MAGPIE_HUB_TINY_QWEN_TOKENIZER"
_QWEN_HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _llama3_tokenizer(chat_template_from):
    template = (read_chat_template(chat_template_from) if chat_template_from
                else package_data("llama3_chat_template.jinja").decode("utf-8"))
    named = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    return fast_tokenizer([(t, True) for t in LLAMA3_SPECIALS], named, template, train=True)


def _hash_sources(paths: list[Path]) -> dict[str, str]:
    out = {}
    for path in paths:
        if path.is_file():
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _default_qwen_tokenizer() -> Path:
    env = os.environ.get(QWEN_TOKENIZER_ENV)
    if env:
        return Path(env)
    found = try_to_load_from_cache(_QWEN_HUB_ID, "tokenizer_config.json")
    if isinstance(found, str):
        return Path(found).parent
    raise ModelError(f"tiny:qwen2.5 needs the Qwen2.5 tokenizer files: set {QWEN_TOKENIZER_ENV}=DIR (a folder "
                     f"with vocab.json, merges.txt, tokenizer_config.json), use tiny:qwen2.5:DIR, or download "
                     f"{_QWEN_HUB_ID} into the Hub cache")


def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MAGPIE_HUB_CACHE") or Path.home() / ".cache" / "magpie-hub") / "tiny-models"


def build_tiny_model(family: str, *, chat_template_from=None, tokenizer_from=None, seed: int = 0,
                     cache_dir=None) -> Path:
    """Build (or reuse from the cache) a tiny random-weight causal LM folder; return its path."""
    if family not in ("llama3", "qwen2.5"):
        raise ModelError(f"unknown tiny model family {family!r}: use llama3 or qwen2.5")
    if family == "llama3":
        if tokenizer_from is not None:
            raise ModelError("tiny llama3 trains its own tokenizer: pass chat_template_from=DIR, not tokenizer_from")
        src = Path(chat_template_from) if chat_template_from else None
        sources = [src / "tokenizer_config.json", src / "chat_template.jinja"] if src else []
        hashes = {"corpus": hashlib.sha256(package_data("tiny_corpus.txt")).hexdigest(),
                  "template": hashlib.sha256(package_data("llama3_chat_template.jinja")).hexdigest(),
                  **_hash_sources(sources)}
    else:
        if chat_template_from is not None:
            raise ModelError("tiny qwen2.5 uses the template of its tokenizer: pass tokenizer_from=DIR only")
        if tokenizer_from is None:
            raise ModelError("tiny qwen2.5 needs tokenizer_from=DIR (a Qwen2.5 tokenizer folder): pass the folder "
                             f"or set {QWEN_TOKENIZER_ENV}")
        if not Path(tokenizer_from).is_dir():
            raise ModelError(f"tokenizer folder {tokenizer_from} does not exist: pass a Qwen2.5 tokenizer folder")
        hashes = _hash_sources([Path(tokenizer_from) / f for f in (*_TOKENIZER_FILES, "generation_config.json")])
    key_data = {"family": family, "seed": int(seed), "build": BUILD_VERSION, "turn_tokens": TURN_TOKENS,
                "shape": [HIDDEN, LAYERS, HEADS, KV_HEADS, FFN], "sources": hashes}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    root = _cache_root(cache_dir)
    final = root / f"tiny-{family}-s{seed}-{key}"
    if (final / "magpie_tiny.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        if family == "llama3":
            tok = _llama3_tokenizer(chat_template_from)
        else:
            tok = load_tokenizer(str(tokenizer_from))
        _make_model(family, tok, seed=seed, turn_tokens=TURN_TOKENS, out=tmp,
                   source_eos=list(generation_eos_ids(str(tokenizer_from), None)) if tokenizer_from else [])
        (tmp / "magpie_tiny.json").write_text(json.dumps({**key_data, "key": key, "random_weights": True},
                                                         indent=2), encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use its copy
            if not (final / "magpie_tiny.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _calibration_stats(model, ids, eot: int):
    """Final-norm outputs' bias feature h[..., 0], eot logits and logsumexp of the other logits."""
    captured = {}
    handle = model.model.norm.register_forward_hook(lambda _m, _i, out: captured.update(h=out))
    try:
        logits = model(input_ids=ids).logits.float()
    finally:
        handle.remove()
    others = logits.clone()
    others[..., eot] = float("-inf")
    return captured["h"][..., 0].float(), logits[..., eot], torch.logsumexp(others, dim=-1), logits


def _raise_logit(model, head, eot: int, h0, l_eot, lse, turn_tokens: int) -> None:
    """Add to the eot row's bias-feature weight so the mean P(eot) over the positions = 1 / turn_tokens."""
    lo, hi = -100.0, 100.0
    for _ in range(60):  # bisection on the added weight
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if torch.sigmoid(l_eot + mid * h0 - lse).mean() < 1.0 / turn_tokens else (lo, mid)
    head[eot, 0] += (lo + hi) / 2


def _make_model(family: str, tok, *, seed: int, turn_tokens: int, out: Path, source_eos: list[int]) -> None:
    """Seeded random weights; dimension 0 of the residual stream carries a constant "bias feature" so the
    end-of-turn logit can be raised by a calibrated amount (LLaMA/Qwen2 heads have no bias)."""
    fmt = ChatFormat(tok, f"tiny:{family}")
    eot = int(tok.convert_tokens_to_ids(fmt.assistant_stop[0]))
    extra = [tok.convert_tokens_to_ids("<|end_of_text|>")] if family == "llama3" else []
    eos_ids = list(dict.fromkeys([eot, *source_eos, *extra, *fmt.stop_token_ids]))
    common = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, bos_token_id=tok.bos_token_id,
                  eos_token_id=eos_ids, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if family == "llama3":
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=8192, tie_word_embeddings=False, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=32768, tie_word_embeddings=False, **common))
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tok), (8, 64), generator=gen)
    with torch.no_grad():
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb[:, 0] = 20 * emb[:, 1:].std()  # dominates the residual: h[..., 0] is nearly constant
        head[:, 0] = 0.0
        head[eot, :] = 0.0  # its logit is then the calibrated bias alone: P(eot) barely depends on context
        _, _, _, logits = _calibration_stats(model, ids, eot)
        model.model.norm.weight[1:] *= LOGIT_STD / float(logits.std(dim=-1).mean())
        _raise_logit(model, head, eot, *_calibration_stats(model, ids, eot)[:3], turn_tokens)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos_ids,
                                               pad_token_id=tok.pad_token_id)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in CLI output
    try:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def resolve_model(name: str) -> str:
    """``tiny:llama3`` / ``tiny:qwen2.5`` (optionally ``tiny:FAMILY:DIR``) -> a local model folder.

    For llama3, DIR supplies the chat template; for qwen2.5, the tokenizer (default: $MAGPIE_HUB_TINY_QWEN_TOKENIZER
    or the Hub cache of Qwen/Qwen2.5-0.5B-Instruct). Any other string is returned unchanged."""
    if not isinstance(name, str) or not name.startswith("tiny:"):
        return name
    family, _, source = name[len("tiny:"):].partition(":")
    if family == "llama3":
        return str(build_tiny_model("llama3", chat_template_from=source or None))
    if family == "qwen2.5":
        return str(build_tiny_model("qwen2.5", tokenizer_from=source or _default_qwen_tokenizer()))
    raise ModelError(f"unknown tiny model {name!r}: use tiny:llama3 or tiny:qwen2.5")


register_scheme("tiny:", resolve_model)
