"""``reward``: the score of a sequence-classification reward model on each (instruction, response).

As in the MAGPIE releases (FsfairX-LLaMA3-RM-v0.1, the default): the pair is rendered as a two-message
chat with the REWARD model's own chat template and scored by ``AutoModelForSequenceClassification``
(the first logit). Columns: ``instruct_reward`` (float), ``reward_model``. With ``base_column: COL``
(a column holding a base model's response to the same instruction, e.g. ``base_output``), also
``base_reward`` and ``reward_difference = instruct_reward - base_reward`` — what the Air filter reads.

Options: ``model``, ``revision``, ``base_column``, ``inference_batch`` (sequences per forward pass,
default 8; sorted by length), ``max_length`` (tokens, default 4096; longer pairs are truncated and
counted), ``device`` (default cuda when available), ``dtype`` (default bfloat16 on GPU, float32 on CPU),
``batch_size`` (rows per checkpointed chunk), ``trust_remote_code`` (a model with its own code whose output
has ``score``, e.g. ArmoRM-Llama3-8B-v0.1, the official Magpie-DPO reward model: scored one pair at a time,
``output.score`` as in the official ``gen_po_rewards.py``).

:class:`RewardScorer` is the loaded model; preference builds get it from :mod:`magpie_hub.pipeline` as their
scorer (the build stage never imports this one). A head with more than one label and no ``score`` output is
refused: its first logit is not a reward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from magpie_hub.errors import MagpieError, ModelError, RecipeError
from magpie_hub.models import load_tokenizer, resolve_model
from magpie_hub.tags.base import Batch, TagContext, TagStep
from magpie_hub.tags.columns import Column

DEFAULT_REWARD_MODEL = "sfairXC/FsfairX-LLaMA3-RM-v0.1"
_OPTIONS = {"model", "revision", "base_column", "inference_batch", "max_length", "device", "dtype", "batch_size",
            "trust_remote_code"}


@contextlib.contextmanager
def _loading(who: str, model: str) -> Iterator[None]:
    """A loader failure (not available offline, not a model) as one line naming the model."""
    try:
        yield
    except MagpieError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is the user's model choice
        raise ModelError(f"{who}: cannot load {model!r} ({type(exc).__name__}), it is not available offline or "
                         "not a usable sequence-classification model",
                         hint="download it once while online, or name a local directory") from None


class RewardScorer:
    """A loaded reward model: :meth:`score` gives the reward of (instruction, response) pairs."""

    def __init__(self, model: str = DEFAULT_REWARD_MODEL, *, revision: str | None = None,
                 trust_remote_code: bool = False, inference_batch: int = 8, max_length: int = 4096,
                 device: str | None = None, dtype: str | None = None, who: str = "reward model"):
        self.model_name, self.revision, self.trust_remote_code = str(model), revision, bool(trust_remote_code)
        self.inference_batch, self.max_length = int(inference_batch), int(max_length)
        self.counts = {"pairs": 0, "truncated": 0}
        path = resolve_model(self.model_name)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise RecipeError(f"{who}: unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        with _loading(who, self.model_name):
            self.tokenizer = load_tokenizer(path, revision=revision)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, revision=revision, dtype=getattr(torch, str(dtype)),
                trust_remote_code=self.trust_remote_code).to(device).eval()
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelError(f"reward model {self.model_name!r} has no chat template to render (instruction, "
                             "response) with; use a reward model whose tokenizer has one")
        self.device, self.dtype = str(device), str(dtype)
        self.bos = self.tokenizer.bos_token
        self.output = self._probe()

    def _probe(self) -> str:
        """``score`` (the output has a score: ArmoRM) or ``logit`` (a one-label head); else refused."""
        ids = torch.tensor([self._encode("Hi", "Hello.")], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids)
        if getattr(out, "score", None) is not None:
            return "score"
        labels = out.logits.shape[-1]
        if labels != 1:
            hint = " (it may have a score output: set trust_remote_code: true)" if not self.trust_remote_code else ""
            raise RecipeError(f"reward model {self.model_name!r} has {labels} labels and no score output{hint}; "
                              "use a one-label reward head or a model whose output has score")
        return "logit"

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
        """Reward of each (instruction, response); ``None`` where either text is missing. A pair's score
        depends only on the pairs scored with it (batches are formed within one call)."""
        encoded: dict[int, list[int]] = {}
        for i, (ins, res) in enumerate(pairs):
            if isinstance(ins, str) and isinstance(res, str) and ins.strip():
                encoded[i] = self._encode(ins, res)
        self.counts["pairs"] += len(encoded)
        out: list[float | None] = [None] * len(pairs)
        order = sorted(encoded, key=lambda i: len(encoded[i]))
        batch = 1 if self.output == "score" else self.inference_batch   # remote code: no padding assumptions
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            for i, value in zip(chunk, self._forward([encoded[i] for i in chunk]), strict=True):
                out[i] = float(value)
        return out

    def _forward(self, seqs: list[list[int]]) -> list[float]:
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
            out = self.model(input_ids=ids, attention_mask=mask)
        values = out.score if self.output == "score" else out.logits[:, 0]
        return values.reshape(len(seqs), -1)[:, 0].float().cpu().tolist()

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "revision": self.revision, "trust_remote_code": self.trust_remote_code,
                "output": self.output, "device": self.device, "dtype": self.dtype, "max_length": self.max_length,
                "counts": dict(self.counts)}

    def close(self) -> None:
        self.model = None


class LogLikelihoodScorer:
    """A stand-in scorer, for when no reward model is available (offline): the mean log-probability per
    token of the response given the instruction under a causal LM, both rendered with the LM's own chat
    template. It is not a reward model: it prefers what the LM itself finds likely (often shorter, more
    generic text). Preference configs choose it with ``reward: {scorer: loglik, model: LM}``."""

    output = "loglik"

    def __init__(self, model: str, *, revision: str | None = None, max_length: int = 4096, device: str | None = None,
                 dtype: str | None = None, who: str = "log-likelihood scorer", **_: Any):
        self.model_name, self.revision, self.max_length = str(model), revision, int(max_length)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or "float32"
        self.counts = {"pairs": 0, "truncated": 0}
        with _loading(who, self.model_name):
            path = resolve_model(self.model_name)
            self.tokenizer = load_tokenizer(path, revision=revision)
            self.model = AutoModelForCausalLM.from_pretrained(path, revision=revision,
                                                              dtype=getattr(torch, self.dtype)).to(self.device).eval()
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelError(f"{who}: {self.model_name!r} has no chat template to render (instruction, response) with")

    def _ids(self, instruction: str, response: str) -> tuple[list[int], int]:
        chat = [{"role": "user", "content": instruction}]
        prompt = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        head = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        body = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = head + body
        if len(ids) > self.max_length:       # the response's tail is cut (and counted), as the reward model's
            self.counts["truncated"] += 1
            ids = ids[: max(self.max_length, len(head) + 1)]
        return ids, len(head)

    def score(self, pairs: list[tuple[Any, Any]]) -> list[float | None]:
        out: list[float | None] = []
        for ins, res in pairs:
            if not (isinstance(ins, str) and isinstance(res, str) and ins.strip() and res):
                out.append(None)
                continue
            ids, start = self._ids(ins, res)
            self.counts["pairs"] += 1
            with torch.inference_mode():
                logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
            logp = torch.log_softmax(logits[start - 1:-1], dim=-1)
            target = torch.tensor(ids[start:], device=self.device)
            out.append(float(logp.gather(-1, target[:, None]).mean()))
        return out

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "revision": self.revision, "output": self.output, "device": self.device,
                "dtype": self.dtype, "max_length": self.max_length, "counts": dict(self.counts),
                "note": "mean response-token log-probability under a causal LM: a stand-in, not a reward model"}

    def close(self) -> None:
        self.model = None


SCORERS = {"classifier": RewardScorer, "loglik": LogLikelihoodScorer}


def make_scorer(options: dict[str, Any], who: str = "preference reward model"):
    """The scorer a preference config names (``reward:`` options; ``scorer`` picks the kind)."""
    options = dict(options)
    return SCORERS[options.pop("scorer", "classifier")](who=who, **options)


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
        self.scorer: RewardScorer | None = None

    def writes(self, column: Column) -> bool:
        """``base_reward`` / ``reward_difference`` only with ``base_column``."""
        return super().writes(column) or self.base_column is not None

    def setup(self) -> None:
        with self.loading("reward model", self.model_name):
            self.scorer = RewardScorer(self.model_name, revision=self.revision,
                                       trust_remote_code=bool(self.options.get("trust_remote_code")),
                                       inference_batch=self.inference_batch, max_length=self.max_length,
                                       device=self.options.get("device"), dtype=self.options.get("dtype"),
                                       who="tag step 'reward'")
        self.device, self.dtype = self.scorer.device, self.scorer.dtype

    def close(self) -> None:
        if self.counts["rows"]:
            c = self.counts
            Console(stderr=True, highlight=False).print(
                f"tag reward: {c['scored']}/{c['rows']} scored by {self.model_name}; {c['no_input']} without "
                f"input, {c['truncated']} truncated to {self.max_length} tokens")
        if self.scorer is not None:
            self.scorer.close()

    def score(self, pairs: list[tuple[Any, Any]]) -> list[float | None]:
        """Reward of each (instruction, response); ``None`` where either text is missing."""
        before = self.scorer.counts["truncated"]
        out = self.scorer.score(pairs)
        self.counts["truncated"] += self.scorer.counts["truncated"] - before
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
                "base_column": self.base_column, "counts": dict(self.counts),
                "output": self.scorer.output if self.scorer is not None else None}
