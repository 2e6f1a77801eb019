"""The tag-step interface: one :class:`TagStep` subclass per column family.

A step declares the columns it adds (``features``, a :class:`datasets.Features`), the columns it reads
(``requires``) and implements ONE method:

* ``scope = "rows"`` (the default): :meth:`TagStep.run` maps a batch of rows (a dict of column lists, as
  ``datasets.Dataset.map(batched=True)`` gives) to a dict of the new columns, same length, same order.
  The runner feeds it chunks of ``batch_size`` rows of one config and checkpoints every finished chunk
  under ``DIR/.magpie/tags/<step>/<config>/`` — a slow judge step resumes at the chunk it was in.
* ``scope = "global"``: :meth:`TagStep.run_global` sees every config at once
  (``{config: {column: list}}``, configs in sorted order = the global row order) and returns
  ``{config: {new column: list}}``. Used by dedup, which compares all rows of all configs.

Lifecycle (driven by :mod:`magpie_hub.tags.runner`): ``Step(context, **options)`` ->
``setup()`` once, before any step runs (load models here; raise a MagpieError if one is unavailable,
so a bad run fails before anything is computed) -> ``run``/``run_global`` -> ``close()`` (free models)
-> ``info()`` is recorded in the manifest's ``tags.steps.<name>`` section.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from datasets import Features

Batch = dict[str, list]


@dataclass
class TagContext:
    """What a step may know about the dataset it tags."""

    directory: Path                 # the dataset directory
    manifest: Mapping[str, Any]     # magpie_manifest.json (read-only; {} when the dir has none)
    work_dir: Path                  # DIR/.magpie/tags/<step>/ : the step's own scratch space (caches)
    configs: tuple[str, ...] = ()   # every config of the dataset, in global order
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def generator_model(self) -> str | None:
        """The model that generated the rows (manifest ``model``, or ``recipe.model``)."""
        model = self.manifest.get("model")
        if isinstance(model, Mapping):  # {"id": ..., "revision": ...}
            model = model.get("id") or model.get("name")
        if not model:
            recipe = self.manifest.get("recipe") or {}
            model = recipe.get("model") if isinstance(recipe, Mapping) else None
            if isinstance(model, Mapping):
                model = model.get("id") or model.get("name")
        return str(model) if model else None

    @property
    def generator_revision(self) -> str | None:
        rev = self.manifest.get("revision") or self.manifest.get("model_revision")
        model = self.manifest.get("model")
        if not rev and isinstance(model, Mapping):
            rev = model.get("revision")
        return str(rev) if rev else None


class TagStep(abc.ABC):
    """Base class of every tag step (see the module docstring for the contract)."""

    name: ClassVar[str]                      # registry name, e.g. "lengths" (``magpie-hub tag --step``)
    features: ClassVar[Features]             # the columns this step adds, typed
    requires: ClassVar[tuple[str, ...]] = ("instruction",)  # input columns it reads
    scope: ClassVar[str] = "rows"            # "rows" | "global"
    batch_size: ClassVar[int] = 10_000       # rows per run() call = per checkpoint (rows scope)
    version: ClassVar[str] = "1"             # bump when the meaning of the columns changes

    def __init__(self, context: TagContext, **options: Any):
        self.context = context
        self.options = dict(options)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.features)

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models/tokenizers; raise a MagpieError naming the fix if something is unavailable."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free models once the step has run on every pending config (called by the runner)."""

    def run(self, batch: Batch) -> Batch:
        """Rows scope: the new columns for ``batch`` (same length, same order)."""
        raise NotImplementedError(f"tag step {self.name!r} must implement run()")

    def run_global(self, data: dict[str, Batch]) -> dict[str, Batch]:
        """Global scope: the new columns of every config, given every config's ``requires`` columns."""
        raise NotImplementedError(f"tag step {self.name!r} must implement run_global()")

    def fingerprint(self) -> dict[str, Any]:
        """What makes a checkpoint of this step reusable (version + options); JSON-serialisable."""
        return {"version": self.version, "options": _jsonable(self.options)}

    def info(self) -> dict[str, Any]:
        """Recorded in the manifest under ``tags.steps.<name>``: columns, version, models used."""
        return {"columns": list(self.columns), "version": self.version, "options": _jsonable(self.options)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
