"""``lengths``: instruction/response length in tokens of the GENERATING model's tokenizer, and in chars.

Multi-turn rows: the lengths are those of the ``instruction`` and ``response`` columns, i.e. the FIRST
turn (as in the official releases, where ``input_length``/``output_length`` measure input/output).
Tokens are counted without special tokens (the text alone), with the tokenizer's fast batch path.
A null text gives null lengths.
"""

from __future__ import annotations

from typing import Any

from magpie_hub.dataset.directory import read_config
from magpie_hub.errors import DatasetDirError
from magpie_hub.models import load_tokenizer
from magpie_hub.tags.base import Batch, TagStep


class LengthsStep(TagStep):
    name = "lengths"
    requires = ("instruction", "response")
    batch_size = 20_000
    version = "1"

    def setup(self) -> None:
        self.model = self.options.get("model") or self.context.generator_model or self._model_from_rows()
        self.revision = self.options.get("revision") or (
            None if self.options.get("model") else self.context.generator_revision)
        with self.loading("the tokenizer of", self.model,
                          hint="make the generating model available offline or set tags: [{lengths: {model: DIR}}]"):
            self.tokenizer = load_tokenizer(self.model, revision=self.revision)  # resolves tiny:... references

    def _model_from_rows(self) -> str:
        for config in self.context.configs:
            data = read_config(self.context.directory, config, columns=["model"])
            if "model" in data.table.column_names:
                values = [v for v in data.table.column("model").to_pylist() if v]
                if values:
                    return values[0]
        raise DatasetDirError("no generating model recorded (manifest `model` or a `model` column)",
                              hint="set tags: [{lengths: {model: ID_OR_DIR}}] in the recipe")

    def _count(self, texts: list[str | None]) -> list[int | None]:
        present = [i for i, t in enumerate(texts) if t is not None]
        out: list[int | None] = [None] * len(texts)
        if present:
            enc = self.tokenizer([texts[i] for i in present], add_special_tokens=False,
                                 return_attention_mask=False, verbose=False)["input_ids"]
            for i, ids in zip(present, enc, strict=True):
                out[i] = len(ids)
        return out

    def run(self, batch: Batch) -> Batch:
        ins, res = batch["instruction"], batch["response"]
        return {
            "instruction_length": self._count(ins),
            "response_length": self._count(res),
            "instruction_chars": [None if t is None else len(t) for t in ins],
            "response_chars": [None if t is None else len(t) for t in res],
        }

    def info(self) -> dict[str, Any]:
        return {**super().info(), "model": self.model, "revision": self.revision,
                "tokenizer": type(self.tokenizer).__name__, "turns": "first"}
