"""Loading a recipe: YAML -> overrides -> validated :class:`Recipe`, every error as one line."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from magpie_hub.errors import RecipeError, register_secrets_in
from magpie_hub.generate.backends import BACKENDS, option_keys
from magpie_hub.recipe.schema import MAX_ROWS, Recipe


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        where, _, key = loc.rpartition(".")
        return f"unknown key {key!r}" + (f" in {where}" if where else "") + " (check the spelling; see builders/demo.yaml)"
    if kind == "missing":
        return f"missing required key {loc!r}"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def apply_overrides(data: dict, overrides: Mapping[str, Any] | None) -> dict:
    """Apply command-line overrides (rows, model, backend, endpoint) to raw recipe data.

    ``backend`` replacing the recipe's backend keeps only the ``backend_options`` the new backend accepts
    (the others belong to the recipe's backend); ``endpoint`` sets ``backend_options.endpoint``."""
    data = dict(data)
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "model" in ov and ov["model"] != data.get("model"):
        data["model"] = ov["model"]
        data.pop("revision", None)   # the recipe's revision belongs to its own model
    if "backend" in ov and ov["backend"] != data.get("backend", Recipe.model_fields["backend"].default):
        opts = data.get("backend_options")
        if isinstance(opts, dict) and opts:
            accepted = set(option_keys(ov["backend"]))
            data["backend_options"] = {k: v for k, v in opts.items() if k in accepted}
        data["backend"] = ov["backend"]
    if "endpoint" in ov:
        backend = data.get("backend", Recipe.model_fields["backend"].default)
        if isinstance(backend, str) and "endpoint" not in option_keys(backend):
            servers = [name for name in BACKENDS if "endpoint" in option_keys(name)]
            raise RecipeError(f"--endpoint is for the server backends ({', '.join(servers)}); the {backend} "
                              "backend takes no endpoint")
        opts = data.get("backend_options") or {}
        data["backend_options"] = {**(opts if isinstance(opts, dict) else {}), "endpoint": ov["endpoint"]}
    if "rows" in ov:
        if isinstance(ov["rows"], bool) or not isinstance(ov["rows"], int) or ov["rows"] <= 0:
            raise RecipeError(f"--rows must be a positive integer (got {ov['rows']})")
        if ov["rows"] > MAX_ROWS:
            raise RecipeError(f"--rows {ov['rows']} is more than one config holds ({MAX_ROWS:,})",
                              hint="split the data into several configs, or several builds into other --out "
                                   "directories")
        configs = data.get("configs")
        if isinstance(configs, dict):
            data["configs"] = {k: {**v, "rows": ov["rows"]} if isinstance(v, dict) else v for k, v in configs.items()}
    return data


def parse_recipe(data: Any, *, source: str = "recipe", overrides: Mapping[str, Any] | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the top level must be a mapping of keys (name, model, configs, ...)")
    data = apply_overrides(data, overrides)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_describe(exc.errors()[0])}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                    seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:       # an unhashable key: yaml's own error follows
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first}); keep one of them",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe YAML; ``overrides`` = {rows, model, backend, endpoint} (None = keep)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} not found (see builders/ for examples)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    register_secrets_in(data)   # a token or key given in the recipe (any section) is redacted everywhere
    return parse_recipe(data, source=str(path), overrides=overrides)
