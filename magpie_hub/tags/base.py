"""The tag-step interface: one :class:`TagStep` subclass per column family.

The columns a step adds are declared with its registry entry (``STEPS`` in :mod:`magpie_hub.tags`, the
one column registry); ``features`` (a :class:`datasets.Features`) is derived from them. A step declares
the columns it reads (``requires``) and implements ONE method:

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
-> ``info()`` is recorded in the manifest's ``tags.steps.<name>`` section. Model-loading failures go
through :meth:`TagStep.loading`, so every step reports them the same way.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from datasets import Features, List, Value

from magpie_hub.errors import MagpieError, ModelError
from magpie_hub.layout import WORK_DIR
from magpie_hub.tags import registered
from magpie_hub.tags.columns import Column

Batch = dict[str, list]


def work_dir(directory: Path, step: str) -> Path:
    """``DIR/.magpie/tags/<step>/``: a step's scratch space (checkpoints, caches, files for later stages)."""
    return Path(directory) / WORK_DIR / "tags" / step


def features_of(columns: tuple[Column, ...]) -> Features:
    """The ``datasets.Features`` of declared columns (``list[<dtype>]`` -> a list of that value type)."""
    def feature(dtype: str):
        return List(Value(dtype[5:-1])) if dtype.startswith("list[") else Value(dtype)

    return Features({c.name: feature(c.dtype) for c in columns})


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
    requires: ClassVar[tuple[str, ...]] = ("instruction",)  # input columns it reads
    scope: ClassVar[str] = "rows"            # "rows" | "global"
    batch_size: ClassVar[int] = 10_000       # rows per run() call = per checkpoint (rows scope)
    version: ClassVar[str] = "1"             # bump when the meaning of the columns changes

    def __init__(self, context: TagContext, **options: Any):
        self.context = context
        self.options = dict(options)

    @property
    def outputs(self) -> tuple[Column, ...]:
        """The registered columns this step writes with its options (in registry order)."""
        return tuple(c for c in registered(self.name).columns if self.writes(c))

    def writes(self, column: Column) -> bool:
        """Whether this run writes ``column``; columns with a ``hint`` only when an option asks for them."""
        return column.hint is None

    def output(self, name: str) -> Column:
        return next(c for c in registered(self.name).columns if c.name == name)

    @property
    def features(self) -> Features:
        """The columns this step adds, typed."""
        return features_of(self.outputs)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.outputs)

    @contextlib.contextmanager
    def loading(self, what: str, model: str, *, hint: str | None = None) -> Iterator[None]:
        """Model-loading errors, once for every step: inside ``with self.loading("judge", model):`` a
        MagpieError (already one line naming the cause) gains the step and how to choose another model;
        any other loader failure becomes one "cannot load" line (``hint`` replaces the default advice)."""
        choose = f"tags: [{{{self.name}: {{model: ID_OR_DIR}}}}]"
        try:
            yield
        except MagpieError as exc:
            raise ModelError(f"tag step {self.name!r}, {what} {model}: {exc}; or choose it with {choose}") from None
        except Exception as exc:  # noqa: BLE001 - any loader failure is the user's model choice
            raise ModelError(f"tag step {self.name!r}: cannot load {what} {model!r} ({type(exc).__name__}), "
                             "it is not available offline or not a usable model",
                             hint=hint or f"download it once while online, or set {choose}") from None

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
