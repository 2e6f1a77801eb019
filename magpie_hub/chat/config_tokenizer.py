"""Tokenizers made here: for a config-only folder (a chat template and special tokens, no vocabulary) and
for the demo models. A small byte-level BPE (trained on ``data/tiny_corpus.txt``, or bytes only) plus the
config's special tokens and chat template: strings render exactly like the real tokenizer's; ids do not.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from magpie_hub.errors import ModelError

BPE_VOCAB = 2000


def package_data(name: str) -> bytes:
    return resources.files("magpie_hub").joinpath("data", name).read_bytes()


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(directory: str | Path) -> str:
    """The chat template stored in a tokenizer folder (chat_template.jinja or tokenizer_config.json)."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        cfg = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except OSError:
        raise ModelError(f"{directory} has no tokenizer_config.json: pass a folder with a chat template") from None
    except ValueError:
        raise ModelError(f"{directory}/tokenizer_config.json is not valid JSON: fix the file") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and (directory / "chat_template.json").is_file():
        template = json.loads((directory / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    if not template:
        raise ModelError(f"{directory} has no chat template (tokenizer_config.json 'chat_template'): "
                         "use an instruction-tuned model's tokenizer folder")
    return template


def _byte_level_bpe(vocab_size: int, train: bool):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if train:
        tk = Tokenizer(models.BPE())
    else:
        tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if train:
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
        tk.train_from_iterator(package_data("tiny_corpus.txt").decode("utf-8").splitlines(), trainer=trainer)
    return tk


def fast_tokenizer(specials: list[tuple[str, bool]], named: dict[str, str | None], template: str,
                    *, train: bool, vocab_size: int = BPE_VOCAB):
    """A PreTrainedTokenizerFast over a byte-level BPE plus ``specials`` (content, special) in order."""
    tk = _byte_level_bpe(vocab_size, train)
    for content, special in specials:
        tk.add_tokens([AddedToken(content, special=special, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **{k: v for k, v in named.items() if v})
    tok.chat_template = template
    return tok


def tokenizer_from_config(directory: str | Path, *, train: bool = True):
    """A tokenizer for a config-only folder (no vocabulary): a small byte-level BPE (``train=False``:
    bytes only, instant), the config's special/added tokens, and its chat template. Strings render
    exactly like the real tokenizer's; token ids are NOT the model's."""
    directory = Path(directory)
    template = read_chat_template(directory)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    stm_path = directory / "special_tokens_map.json"
    stm = json.loads(stm_path.read_text(encoding="utf-8")) if stm_path.is_file() else {}
    named = {key: _token_text(cfg.get(key)) or _token_text(stm.get(key))
             for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    specials: list[tuple[str, bool]] = []
    decoder = cfg.get("added_tokens_decoder") or {}
    for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        specials.append((entry["content"], bool(entry.get("special", True))))
    extra = cfg.get("additional_special_tokens") or stm.get("additional_special_tokens") or []
    specials += [(t, True) for t in map(_token_text, [*named.values(), *extra]) if t]
    seen: set[str] = set()
    specials = [s for s in specials if not (s[0] in seen or seen.add(s[0]))]
    return fast_tokenizer(specials, named, template, train=train)
