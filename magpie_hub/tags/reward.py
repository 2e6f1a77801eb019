"""``reward``: the score of a sequence-classification reward model on each (instruction, response).

As in the MAGPIE releases (FsfairX-LLaMA3-RM-v0.1, the default): the pair is rendered as a two-message
chat with the REWARD model's own chat template and scored by ``AutoModelForSequenceClassification``
(the first logit). Columns: ``instruct_reward`` (float), ``reward_model``. With ``base_column: COL``
(a column holding a base model's response to the same instruction, e.g. ``base_output``), also
``base_reward`` and ``reward_difference = instruct_reward - base_reward`` — what the Air filter reads.

Options: ``model``, ``revision``, ``base_column``, ``inference_batch`` (sequences per forward pass,
default 8; sorted by length), ``max_length`` (tokens, default 4096; longer pairs are truncated and
counted), ``device`` (default cuda when available), ``dtype`` (default bfloat16 on GPU, float32 on CPU),
``batch_size`` (rows per checkpointed chunk).
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from transformers import AutoModelForSequenceClassification

from magpie_hub.errors import ModelError, RecipeError
from magpie_hub.models import load_tokenizer, resolve_model
from magpie_hub.tags.base import Batch, TagContext, TagStep
from magpie_hub.tags.columns import Column

DEFAULT_REWARD_MODEL = "sfairXC/FsfairX-LLaMA3-RM-v0.1"
_OPTIONS = {"model", "revision", "base_column", "inference_batch", "max_length", "device", "dtype", "batch_size"}


class RewardStep(TagStep):
    name = "reward"
    requires = ("instruction", "response")
    batch_size = 2_000

    def __init__(self, context: TagContext, **options: Any):
        super().__init__(context, **options)
        unknown = sorted(set(self.options) - _OPTIONS)
        if unknown:
            raise RecipeError(f"tag step 'reward': unknown options {unknown}; allowed: {', '.join(sorted(_OPTIONS))}")
        self.model_name = str(self.options.get("model") or DEFAULT_REWARD_MODEL)
        self.revision = self.options.get("revision")
        self.base_column = self.options.get("base_column")
        for key, default in (("inference_batch", 8), ("max_length", 4096)):
            value = self.options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"tag step 'reward': {key} must be a whole number >= 1 (got {value!r})")
            setattr(self, key, value)
        if self.base_column is not None:
            if not isinstance(self.base_column, str) or not self.base_column:
                raise RecipeError("tag step 'reward': base_column must name the column of base-model responses")
            self.requires = ("instruction", "response", self.base_column)
        self.counts = {"rows": 0, "scored": 0, "no_input": 0, "truncated": 0}

    def writes(self, column: Column) -> bool:
        """``base_reward`` / ``reward_difference`` only with ``base_column``."""
        return super().writes(column) or self.base_column is not None

    def setup(self) -> None:
        path = resolve_model(self.model_name)
        device = self.options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.options.get("dtype") or ("bfloat16" if str(device).startswith("cuda") else "float32")
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise RecipeError(f"tag step 'reward': unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        with self.loading("reward model", self.model_name):
            self.tokenizer = load_tokenizer(path, revision=self.revision)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, revision=self.revision, dtype=getattr(torch, str(dtype))).to(device).eval()
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelError(f"reward model {self.model_name!r} has no chat template to render (instruction, "
                             "response) with; use a reward model whose tokenizer has one")
        self.device, self.dtype = str(device), str(dtype)
        self.bos = self.tokenizer.bos_token

    def close(self) -> None:
        if self.counts["rows"]:
            c = self.counts
            Console(stderr=True, highlight=False).print(
                f"tag reward: {c['scored']}/{c['rows']} scored by {self.model_name}; {c['no_input']} without "
                f"input, {c['truncated']} truncated to {self.max_length} tokens")
        self.model = None

    def _encode(self, instruction: str, response: str) -> list[int]:
        chat = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(chat, tokenize=False)
        # the rendered text carries BOS when the template writes it: do not add a second one
        special = not (self.bos and text.startswith(self.bos))
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) > self.max_length:
            self.counts["truncated"] += 1
            ids = ids[: self.max_length]
        return ids

    def score(self, pairs: list[tuple[Any, Any]]) -> list[float | None]:
        """Reward of each (instruction, response); ``None`` where either text is missing."""
        encoded: dict[int, list[int]] = {}
        for i, (ins, res) in enumerate(pairs):
            if isinstance(ins, str) and isinstance(res, str) and ins.strip():
                encoded[i] = self._encode(ins, res)
        out: list[float | None] = [None] * len(pairs)
        order = sorted(encoded, key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.inference_batch):
            chunk = order[start:start + self.inference_batch]
            seqs = [encoded[i] for i in chunk]
            width = max(len(s) for s in seqs)
            # Sequence-classification heads score the last token that is not pad_token_id: pad (on the
            # right) with an id that occurs in none of these sequences, so end-of-turn tokens still count.
            used = {t for s in seqs for t in s}
            pad = self.tokenizer.pad_token_id
            if pad is None or pad in used:
                pad = next(t for t in range(len(self.tokenizer)) if t not in used)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
            self.model.config.pad_token_id = pad
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            for i, value in zip(chunk, logits[:, 0].float().cpu().tolist(), strict=True):
                out[i] = float(value)
        return out

    def run(self, batch: Batch) -> Batch:
        rewards = self.score(list(zip(batch["instruction"], batch["response"], strict=True)))
        n = len(rewards)
        self.counts["rows"] += n
        self.counts["scored"] += sum(r is not None for r in rewards)
        self.counts["no_input"] += sum(r is None for r in rewards)
        out: Batch = {"instruct_reward": rewards,
                      "reward_model": [self.model_name if r is not None else None for r in rewards]}
        if self.base_column is not None:
            base = self.score(list(zip(batch["instruction"], batch[self.base_column], strict=True)))
            out["base_reward"] = base
            out["reward_difference"] = [None if r is None or b is None else r - b
                                        for r, b in zip(rewards, base, strict=True)]
        return out

    def info(self) -> dict[str, Any]:
        return {**super().info(), "model": self.model_name, "revision": self.revision,
                "device": getattr(self, "device", None), "dtype": getattr(self, "dtype", None),
                "base_column": self.base_column, "counts": dict(self.counts)}
