"""Backend dispatch: the one place that maps a backend name to its class (and so to its options model).

Adding a backend = one module with a :class:`~magpie_hub.generate.backends.base.Backend` subclass (its
``Options`` model and its constructor ``Cls(model: str, *, revision: str | None = None, **options)``)
+ one line in :data:`BACKENDS`. The recipe loader validates ``backend_options`` through
:func:`parse_backend_options`; the constructor validates them again (direct use, tag steps).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from magpie_hub.errors import RecipeError
from magpie_hub.generate.backends.base import (
    Backend,
    BackendInfo,
    BackendOptions,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)

BACKENDS: dict[str, str] = {
    "transformers": "magpie_hub.generate.backends.local.transformers:TransformersBackend",
    "tgi": "magpie_hub.generate.backends.http.tgi:TGIBackend",
    "openai": "magpie_hub.generate.backends.http.openai:OpenAICompletionsBackend",
    "dummy": "magpie_hub.generate.backends.fake.dummy:DummyBackend",
    "scripted": "magpie_hub.generate.backends.fake.scripted:ScriptedBackend",
}


def backend_class(name: str) -> type[Backend]:
    try:
        module_name, _, attr = BACKENDS[name].partition(":")
    except KeyError:
        raise RecipeError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}") from None
    return getattr(importlib.import_module(module_name), attr)


def option_keys(name: str) -> list[str]:
    """The ``backend_options`` keys backend ``name`` accepts."""
    return backend_class(name).Options.keys()


def parse_backend_options(name: str, options: Mapping[str, Any] | None) -> BackendOptions:
    """``options`` validated for backend ``name``: one-line RecipeError naming the valid keys otherwise."""
    return backend_class(name).parse_options(options)


def get_backend(name: str, model: str, *, revision: str | None = None, **options) -> Backend:
    """Instantiate backend ``name`` for ``model`` with backend-specific ``options``."""
    return backend_class(name)(model, revision=revision, **options)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendInfo",
    "BackendOptions",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "backend_class",
    "get_backend",
    "option_keys",
    "parse_backend_options",
]
