"""The one place that chains the stages: recipe -> build -> tag -> statistics -> card (-> filter, publish).

Every stage takes its inputs and returns its result; none calls a later one. Each function here is what
one CLI command (or :class:`~magpie_hub.build.hf_builder.MagpieBuilder`) does, and renders the card once
per command that changes a dataset directory.

This is also an edge where model references are made resolvable: importing the demo models and the GGUF
models registers their schemes (``tiny:...``, ``smollm2``, ``*.gguf``) with :mod:`magpie_hub.models`, so
stages, backends and tags never import them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

import magpie_hub.chat.demo_models  # noqa: F401 - registers the ``tiny:`` model references (see docstring)
import magpie_hub.gguf_models  # noqa: F401 - registers ``smollm2`` and ``*.gguf`` (see docstring)
from magpie_hub.build.ray_run import run_build_ray
from magpie_hub.build.run import BuildResult, run_build
from magpie_hub.card.licenses import check_card_license
from magpie_hub.card.render import render_card
from magpie_hub.card.stats import analyze
from magpie_hub.chat.format import ChatFormat, load_chat_format
from magpie_hub.dataset.verify import verify_dataset
from magpie_hub.errors import RecipeError, os_errors
from magpie_hub.filters.apply import FilterReport, check_producible, filter_dataset
from magpie_hub.filters.presets import FilterSpec, recipe_filter_spec
from magpie_hub.hub.publish import PublishResult
from magpie_hub.hub.publish import publish as publish_dir
from magpie_hub.layout import MANIFEST, STATS
from magpie_hub.recipe.load import load_recipe
from magpie_hub.recipe.schema import Recipe
from magpie_hub.tags.mix_classify import check_mix_labels, mix_classifiers
from magpie_hub.tags.runner import StepSpec, tag_dataset, validate_steps


def chat_format(model: str, *, revision: str | None = None) -> ChatFormat:
    """``magpie-hub templates``: the chat-format pieces (a config-only tokenizer folder is enough)."""
    return load_chat_format(model, revision=revision, allow_config_only=True)


@os_errors("build into", "out")
def build(recipe: str | Path, *, out: str | Path | None = None, configs: list[str] | None = None,
          rows: int | None = None, model: str | None = None, backend: str | None = None,
          endpoint: str | None = None, fresh: bool = False, console: Console | None = None,
          ray: str | None = None, ray_workers: int | None = None) -> dict[str, Any]:
    """``magpie-hub build``: generate, then the recipe's ``tags:`` (if any), statistics and the card, then the
    recipe's ``filters:`` (if any) into ``{out}-filtered`` with its own card. ``ray`` (an address, or
    ``local``): the rank shares run as Ray tasks (``build.ray_run``), then the merge here.
    Returns the manifest (``{}`` on data-parallel ranks other than 0)."""
    recipe_path = Path(recipe)
    rec = load_recipe(recipe_path, {"rows": rows, "model": model, "backend": backend, "endpoint": endpoint})
    check_mix_labels(rec)   # mix targets name official labels (their facts live with the tags)
    spec = check_later_stages(rec, recipe_path)   # tags, filters, card licence: before any work
    builder = run_build if ray is None else functools.partial(run_build_ray, address=ray, workers=ray_workers,
                                                              worker_setup=f"{__name__}.ray_worker_setup")
    result: BuildResult = builder(rec, recipe_path=recipe_path, out=out, configs=configs, fresh=fresh,
                                    mix_classifier=mix_classifiers(rec),   # the mix loop's classifier, per config
                                    scorer_factory=reward_scorer,          # preference configs' reward model
                                    console=console)
    if not result.main:
        return {}
    if rec.tags:
        _tag_and_analyze(result.out, rec.tags)
    render_card(result.out)
    if spec is not None:
        filter_dataset(result.out, spec, filtered_dir(result.out), finish=render_card)
    return result.manifest


def ray_worker_setup() -> None:
    """Run first in every Ray worker of a ``--ray`` build: importing this module registered the model
    references (``tiny:``, ``smollm2``, ``*.gguf``; see the module doc), which the workers resolve too."""


def check_later_stages(rec: Recipe, recipe_path: Path) -> FilterSpec | None:
    """What the recipe asks of the later stages, checked when it loads (the recipe stage cannot: it comes
    first): its ``tags:`` steps and their options, its ``filters:`` and the columns they need, its card
    licence. Returns the parsed filter spec."""
    tag_columns = validate_steps(rec.tags) if rec.tags else []
    try:
        check_card_license(rec.card.model_dump(mode="json", exclude_none=True), rec.model)
    except ValueError as exc:
        raise RecipeError(f"{recipe_path}: {exc}") from None
    spec = recipe_filter_spec(rec.filters, recipe_path.parent) if rec.filters else None
    if spec is not None:
        check_producible(spec, tag_columns)
    return spec


def reward_scorer(options: dict[str, Any]):
    """The scorer of a preference config (``tags.reward.make_scorer``: a reward model, or the log-likelihood
    stand-in), handed to the build."""
    # imported here: torch/transformers load only when a recipe has a preference config
    from magpie_hub.tags.reward import make_scorer

    return make_scorer(options)


def filtered_dir(out: Path) -> Path:
    """Where a recipe's ``filters:`` write the filtered copy of ``out``: the sibling ``{out}-filtered``."""
    return out.with_name(f"{out.name}-filtered")


def _tag_and_analyze(directory: Path, steps: Sequence[StepSpec] | None, force: bool = False) -> dict[str, Any]:
    """Tag; recompute the statistics when a step ran or there are none yet. The result says which."""
    result = tag_dataset(directory, steps, force=force)
    result["analyzed"] = bool(result["ran"]) or not (directory / STATS).exists()
    if result["analyzed"]:
        analyze(directory)
    return result


@os_errors("tag", "directory")
def tag(directory: str | Path, steps: Sequence[StepSpec] | None = None, *, force: bool = False) -> dict[str, Any]:
    """``magpie-hub tag``: tag in place; when a step ran (or no statistics exist) recompute them, re-render the card."""
    directory = Path(directory)
    result = _tag_and_analyze(directory, steps, force)
    if result["analyzed"]:
        render_card(directory)
    return result


@os_errors("filter", "directory")
def filter(directory: str | Path, preset: str | Path, out: str | Path) -> FilterReport:  # noqa: A001 - the verb
    """``magpie-hub filter``: the filtered copy gets its card before it replaces ``out``."""
    return filter_dataset(directory, preset, out, finish=render_card)


@os_errors("render the card of", "directory")
def card(directory: str | Path, *, repo: str | None = None, version: str | None = None) -> Path:
    """``magpie-hub card``: render ``DIR/README.md`` of a whole directory (a half-built one is refused)."""
    verify_dataset(directory, action="render the card of")
    return render_card(directory, repo=repo, version=version)


def _pin_card(directory: Path, repo: str, version: str) -> bool:
    """Re-render a magpie-hub card pinned to ``repo@version`` (a hand-made README is left as it is)."""
    if not (directory / MANIFEST).is_file():
        return False
    render_card(directory, repo=repo, version=version)
    return True


@os_errors("publish", "directory")
def publish(directory: str | Path, *, repo: str, version: str, private: bool = False, branch: str = "main",
            message: str | None = None, dry_run: bool = False) -> PublishResult:
    """``magpie-hub publish``: one commit + a tag; the card's loading snippet is pinned to the new tag."""
    return publish_dir(directory, repo=repo, version=version, private=private, branch=branch, message=message,
                       dry_run=dry_run, pin=_pin_card)
