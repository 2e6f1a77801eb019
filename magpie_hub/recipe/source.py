"""Recipe sub-models for where a config's turns come from: another model's responses (``response_model``),
reasoning blocks (``reasoning``) and existing rows (``source``).

``response_model`` (recipe-wide or per config): instructions come from the recipe's ``model``, every
response from this model, rendered with its own chat format (Magpie-Reasoning, MagpieLM: instructions
from one model, responses from another). ``source``: a config starts from an existing dataset (a local
magpie-hub directory or a Hub repo at a revision) instead of generating its instructions: ``answer`` its
instructions with the response model (the official ``gen_res.py --input_file``), ``extend`` its
conversations to the config's ``turns``, or give ``base`` model responses (URIAL prompt) in a
``base_output`` column for the reward step's ``reward_difference``. A preference config with a source makes
pairs for the source's instructions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from magpie_hub.errors import RecipeError
from magpie_hub.generate.backends import parse_backend_options


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResponseModel(_Strict):
    """The model that writes the responses (all turns), with its own backend and options."""

    model: str = Field(min_length=1)
    revision: str | None = None
    backend: str = "transformers"
    backend_options: dict[str, Any] = Field(default_factory=dict)
    license: str | None = None   # the response model's licence when it cannot be derived from its id

    @model_validator(mode="after")
    def _options(self) -> ResponseModel:
        try:  # the backend's own options model, as for the instruction model
            parse_backend_options(self.backend, self.backend_options)
        except RecipeError as exc:
            raise ValueError(f"response_model: {exc}") from None
        return self

    def settings(self) -> dict[str, Any]:
        """What the rows depend on (not the backend: it does not change the text a model writes)."""
        return {"model": self.model, "revision": self.revision}


class ReasoningOptions(_Strict):
    """Reasoning blocks (``<think>...</think>``) in responses: split into the ``reasoning`` column (default)
    or kept inline. The tags are derived from the response model's chat template; ``open`` / ``close``
    name them for a template that does not show them."""

    split: bool = True
    keep_inline: bool = False
    open: str | None = None
    close: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> ReasoningOptions:
        if (self.open is None) != (self.close is None):
            raise ValueError("reasoning: give both open and close tags (e.g. open: '<think>', close: '</think>')")
        if self.open is not None and (not self.open.strip() or not self.close.strip()):
            raise ValueError("reasoning: open / close tags must not be empty")
        return self


class SourceRecipe(_Strict):
    """Existing rows a config starts from: ``path`` (a dataset directory) or ``repo`` (a Hub dataset repo,
    read with ``datasets`` at ``revision``), its ``config`` and ``split``; the first ``rows`` rows are used."""

    path: str | None = None
    repo: str | None = None
    revision: str | None = None
    config: str | None = None
    split: str = "train"
    mode: Literal["answer", "extend", "base"] = "answer"

    @model_validator(mode="after")
    def _one(self) -> SourceRecipe:
        if (self.path is None) == (self.repo is None):
            raise ValueError("source: give exactly one of path (a dataset directory) or repo (a Hub dataset id)")
        if self.path is not None and self.revision is not None:
            raise ValueError("source: revision is for a Hub repo; a directory is read as it is")
        return self

    def settings(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)
