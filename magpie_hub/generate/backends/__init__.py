"""Backend dispatch: the one place that maps a backend name to its class.

Adding a backend = one module with a :class:`~magpie_hub.generate.backends.base.Backend` subclass whose
constructor is ``Cls(model: str, *, revision: str | None = None, **options)`` + one line here.
"""

from __future__ import annotations

import importlib

from magpie_hub.errors import RecipeError
from magpie_hub.generate.backends.base import (
    Backend,
    BackendInfo,
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


def get_backend(name: str, model: str, *, revision: str | None = None, **options) -> Backend:
    """Instantiate backend ``name`` for ``model`` with backend-specific ``options``."""
    return backend_class(name)(model, revision=revision, **options)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendInfo",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "backend_class",
    "get_backend",
]
