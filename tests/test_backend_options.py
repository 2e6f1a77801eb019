"""Typed backend options: one pydantic model per backend, validated when the recipe loads.

An unknown key (or a bad value) is one line naming the valid keys, exit 2, before anything is written; a
``--backend`` override keeps only the options the new backend accepts; backends get validated options.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from magpie_hub.cli import main
from magpie_hub.errors import RecipeError
from magpie_hub.generate.backends import (
    BACKENDS,
    backend_class,
    get_backend,
    option_keys,
    parse_backend_options,
)
from magpie_hub.generate.backends.base import BackendOptions
from magpie_hub.generate.backends.http.tgi import TGIBackend
from magpie_hub.layout import MANIFEST
from magpie_hub.recipe.load import parse_recipe

DUMMY_KEYS = "colon_rate, delay_ms, empty_rate, error_rate, max_concurrency, truncate_rate, words"
TRANSFORMERS = {"model": "tiny:llama3", "backend": "transformers", "configs": {"single_turn": {"rows": 2}},
                "backend_options": {"batch_size": 8, "dtype": "float32", "max_wait_ms": 5}}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_backend_has_a_strict_options_model_in_the_registry():
    for name in BACKENDS:
        options = backend_class(name).Options
        assert issubclass(options, BackendOptions) and options.model_config["extra"] == "forbid", name
        assert option_keys(name) == sorted(options.model_fields)
    assert option_keys("dummy") == DUMMY_KEYS.split(", ")
    assert {"endpoint", "token", "max_retries", "timeout"} <= set(option_keys("tgi"))
    assert {"endpoint", "api_key", "served_model"} <= set(option_keys("openai")) and "token" not in option_keys("openai")


@pytest.mark.parametrize("backend, options, needle", [
    ("dummy", {"delay_ms": 1, "batch_size": 8},
     f"backend_options: unknown dummy backend option 'batch_size'; valid keys: {DUMMY_KEYS}"),
    ("transformers", {"batch_sise": 8, "bogus": 1}, "unknown transformers backend options 'batch_sise', 'bogus'; "
     "valid keys: batch_size, continuous, device_map, dtype, max_wait_ms, num_threads, prefix_cache, "
         "trust_remote_code"),
    ("tgi", {"endpiont": "http://h:1"}, "unknown tgi backend option 'endpiont'; valid keys: backoff_base,"),
    ("openai", {"token": "x"}, "unknown openai backend option 'token'; valid keys: api_key,"),
    ("scripted", {}, "the scripted backend needs backend_options.answers"),
    ("dummy", {"error_rate": 1.5}, "backend_options.error_rate: Input should be less than 1 (dummy backend)"),
    ("transformers", {"batch_size": 0}, "backend_options.batch_size: Input should be greater than or equal to 1"),
    ("transformers", {"dtype": "int3"}, "backend_options.dtype: Input should be 'auto'"),
    ("tgi", {"max_retries": -1}, "backend_options.max_retries: Input should be greater than or equal to 0"),
    ("tgi", {"timeout": "soon"}, "backend_options.timeout: Input should be a valid number"),
])
def test_bad_options_are_refused_when_the_recipe_loads(backend, options, needle):
    data = {"model": "m", "backend": backend, "backend_options": options, "configs": {"a": {"rows": 1}}}
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, source="r.yaml")
    message = str(err.value)
    assert message.startswith("r.yaml: ") and needle in message and "\n" not in message
    with pytest.raises(RecipeError, match="valid keys|Input should|needs backend_options"):  # the same rule
        get_backend(backend, "m", **options)


def test_cli_unknown_backend_option_exit_2_one_line_out_untouched(tmp_path, capsys):
    recipe = _write(tmp_path, {"model": "tiny:llama3", "backend": "dummy", "configs": {"single_turn": {"rows": 2}},
                               "backend_options": {"delay_ms": 1, "eror_rate": 0.1}})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["build", str(recipe), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert "unknown dummy backend option 'eror_rate'" in err and f"valid keys: {DUMMY_KEYS}" in err
    assert not out.exists()


def test_backend_override_drops_the_other_backends_options(tmp_path, capsys, caplog):
    recipe = parse_recipe(TRANSFORMERS, overrides={"backend": "tgi", "endpoint": "http://127.0.0.1:9"})
    assert recipe.backend == "tgi" and recipe.backend_options == {"endpoint": "http://127.0.0.1:9"}
    with caplog.at_level(logging.WARNING):
        backend = TGIBackend(recipe.model, **recipe.backend_options)
    assert backend.url == "http://127.0.0.1:9" and not caplog.records       # no "ignores unknown" warning
    same = parse_recipe(TRANSFORMERS, overrides={"backend": "transformers"})
    assert same.backend_options == TRANSFORMERS["backend_options"]          # same backend: nothing dropped
    shared = parse_recipe({**TRANSFORMERS, "backend": "tgi", "backend_options": {"endpoint": "http://h:1",
                                                                                 "timeout": 5, "token": "t"}},
                          overrides={"backend": "openai"})
    assert shared.backend_options == {"endpoint": "http://h:1", "timeout": 5}  # openai takes no token
    with pytest.raises(RecipeError, match=r"--endpoint is for the server backends \(tgi, openai\)"):
        parse_recipe(TRANSFORMERS, overrides={"backend": "dummy", "endpoint": "http://h:1"})

    out = tmp_path / "out"
    assert main(["build", str(_write(tmp_path, TRANSFORMERS)), "--out", str(out), "--backend", "dummy"]) in (0, None)
    err = capsys.readouterr().err
    assert "ignores unknown" not in err and "batch_size" not in err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["backend"]["name"] == "dummy" and manifest["backend"]["options"] == {}
    assert manifest["recipe"]["backend_options"] == {}


def test_backends_receive_validated_options():
    opts = parse_backend_options("dummy", {"error_rate": "0.25", "words": 4})
    assert opts.error_rate == 0.25 and opts.words == 4 and opts.max_concurrency is None
    dummy = get_backend("dummy", "m", error_rate="0.25", words=4)
    assert dummy.rates[0] == 0.25 and dummy.words == 4
    with pytest.raises(RecipeError, match="backend_options must be a mapping"):
        parse_backend_options("dummy", ["error_rate"])
