"""``language``: the ISO 639-1 code of the instruction, detected offline by lingua-language-detector.

Codes are upper-case (``EN``, ``ZH``) like the official Magpie releases; a text lingua cannot decide
(empty, digits only, ...) gets null. ``low_accuracy: true`` uses lingua's trigram-only mode (about 3x
faster, less accurate on short texts); ``languages: [en, zh, ...]`` restricts the candidates.
"""

from __future__ import annotations

from typing import Any

from magpie_hub.errors import RecipeError
from magpie_hub.tags.base import Batch, TagStep


class LanguageStep(TagStep):
    name = "language"
    requires = ("instruction",)
    batch_size = 20_000
    version = "1"

    def setup(self) -> None:
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        codes = self.options.get("languages")
        if codes:
            try:
                isos = [getattr(IsoCode639_1, str(c).upper()) for c in codes]
            except AttributeError as exc:
                raise RecipeError(f"language step: unknown ISO 639-1 code {exc.name!r}",
                                  hint="use two-letter codes such as en, zh, fr") from None
            if len(isos) < 2:
                raise RecipeError("language step: `languages` needs at least two codes")
            builder = LanguageDetectorBuilder.from_iso_codes_639_1(*isos)
        else:
            builder = LanguageDetectorBuilder.from_all_languages()
        if self.options.get("low_accuracy"):
            builder = builder.with_low_accuracy_mode()
        self.detector = builder.build()

    def run(self, batch: Batch) -> Batch:
        texts = batch["instruction"]
        found = self.detector.detect_languages_in_parallel_of([t or "" for t in texts])
        return {"language": [None if (lang is None or not t) else lang.iso_code_639_1.name
                             for lang, t in zip(found, texts, strict=True)]}

    def close(self) -> None:
        self.detector = None  # lingua's models take ~1 GB; free them once the step is done

    def info(self) -> dict[str, Any]:
        from importlib import metadata

        return {**super().info(), "model": f"lingua-language-detector {metadata.version('lingua-language-detector')}",
                "accuracy": "low" if self.options.get("low_accuracy") else "high"}
