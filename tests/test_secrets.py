"""The one secrets policy (magpie_hub.errors): what counts as a secret, and that no message, manifest or
card line built from options, HTTP error bodies or Hub errors shows one."""

from __future__ import annotations

import httpx2
import pytest

from magpie_hub.card.text import flatten
from magpie_hub.errors import (
    BackendError,
    HubError,
    MagpieError,
    has_secret,
    is_secret_key,
    read_secret,
    redact,
    redact_mapping,
)
from magpie_hub.generate.backends.http.openai import OpenAICompletionsBackend
from magpie_hub.generate.backends.http.tgi import TGIBackend
from magpie_hub.hub.client import HubUnavailableError, call
from magpie_hub.recipe.load import parse_recipe

HF = "hf_" + "AbCdEfGh12345678"
SK = "sk-" + "live-9f8e7d6c5b4a"


@pytest.mark.parametrize("key", ["token", "hf_token", "HF_TOKEN", "api_key", "x-api-key", "Authorization",
                                 "auth_header", "password", "client_secret", "access_token", "apikey"])
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["model", "endpoint", "max_new_tokens", "generated_tokens", "max_total_tokens",
                                 "batch_size", "served_model", "timeout"])
def test_not_secret_keys(key):
    assert not is_secret_key(key)


def test_redact_text_shapes_and_known_values(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "plainkey-without-shape")
    text = (f"token {HF} key {SK} header Authorization: Bearer abc.def-ghi "
            "env plainkey-without-shape")
    out = redact(text)
    for secret in (HF, SK, "abc.def-ghi", "plainkey-without-shape"):
        assert secret not in out
    assert "hf_***" in out and "sk-***" in out and "Bearer ***" in out
    assert has_secret(text) and not has_secret("a plain sentence about tokens and keys")
    assert str(MagpieError(f"failed with {SK}")) == "failed with sk-***"


def test_read_secret_from_dotenv_is_redacted_everywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAGPIE_TEST_KEY", raising=False)
    (tmp_path / ".env").write_text("MAGPIE_TEST_KEY=shapeless-secret-4711\n")
    assert read_secret("MAGPIE_TEST_NONE", "MAGPIE_TEST_KEY") == "shapeless-secret-4711"
    assert "shapeless-secret-4711" not in str(BackendError("server said shapeless-secret-4711"))
    assert read_secret("MAGPIE_TEST_NONE") is None


def test_redact_mapping_masks_or_drops_at_any_depth():
    value = {"endpoint": "http://h:1", "token": HF, "nested": {"api_key": "k-1", "note": f"x {SK}"},
             "list": [{"password": "p"}, "Bearer zzz"], "max_new_tokens": 16}
    masked = redact_mapping(value)
    assert masked == {"endpoint": "http://h:1", "token": "***", "nested": {"api_key": "***", "note": "x sk-***"},
                      "list": [{"password": "***"}, "Bearer ***"], "max_new_tokens": 16}
    dropped = redact_mapping(value, drop=True)
    assert dropped == {"endpoint": "http://h:1", "nested": {"note": "x sk-***"}, "list": [{}, "Bearer ***"],
                       "max_new_tokens": 16}


def test_manifest_options_keep_their_keys_and_hide_secrets():
    recipe = parse_recipe({"model": "m", "backend": "tgi", "configs": {"a": {"rows": 1}},
                           "backend_options": {"endpoint": "http://h:1", "token": HF, "max_retries": 2}})
    assert redact_mapping(recipe.backend_options) == {"endpoint": "http://h:1", "token": "***", "max_retries": 2}
    recipe = parse_recipe({"model": "m", "backend": "openai", "configs": {"a": {"rows": 1}},
                           "backend_options": {"endpoint": "http://h:1", "api_key": "k-123456"}})
    assert redact_mapping(recipe.backend_options) == {"endpoint": "http://h:1", "api_key": "***"}


def test_card_flatten_hides_secret_keys_and_values_keeps_counts():
    rows = dict(flatten({"token": HF, "authorization": "x", "auth_header": "y", "note": f"{SK}",
                         "bearer": "Bearer abc", "generated_tokens": 12, "path": "/home/me", "model": "m"}))
    assert rows == {"note": "***", "bearer": "***", "generated_tokens": 12, "model": "m"}


def _status_error(status: int, body: dict) -> httpx2.HTTPStatusError:
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/completions")
    response = httpx2.Response(status, json=body, request=request)
    return httpx2.HTTPStatusError(f"HTTP {status}", request=request, response=response)


def test_http_error_bodies_are_redacted_in_backend_errors():
    backend = OpenAICompletionsBackend("m", endpoint="http://127.0.0.1:9", api_key=SK)
    body = {"error": {"message": f"bad header Authorization: Bearer {SK}; also {HF} and Bearer other-secret"}}
    with pytest.raises(BackendError, match=r"rejected a request \(HTTP 400\)") as err:
        backend._classify(_status_error(400, body))
    message = str(err.value)
    for secret in (SK, HF, "other-secret", "live-9f8e"):
        assert secret not in message
    assert "Bearer ***" in message and "\n" not in message
    retry = backend._classify(_status_error(503, body))   # transient: the retry reason is redacted too
    assert retry.reason.startswith("HTTP 503") and SK not in retry.reason and "other-secret" not in retry.reason


def test_a_token_given_as_option_is_redacted():
    backend = TGIBackend("m", endpoint="http://127.0.0.1:9", token="opaque-token-value-31337")
    assert backend._headers() == {"Authorization": "Bearer opaque-token-value-31337"}
    assert "opaque-token-value-31337" not in str(BackendError("echo: opaque-token-value-31337"))


def _hub_error(status: int, server_message: str, cls_name: str = "HfHubHTTPError", headers=None):
    from huggingface_hub import errors

    request = httpx2.Request("GET", "https://hub.test/api/datasets/o/r")
    response = httpx2.Response(status, request=request, headers=headers or {})
    return getattr(errors, cls_name)(f"{status} error", response=response, server_message=server_message)


def test_hub_errors_are_told_apart_by_type_and_redacted(monkeypatch):
    monkeypatch.setenv("MAGPIE_HUB_RETRIES", "0")

    def fails(exc):
        def fn():
            raise exc
        return fn

    cases = [(_hub_error(404, "nope", "RepositoryNotFoundError"), "not found or not visible"),
             (_hub_error(404, "nope", "RevisionNotFoundError"), "revision not found in o/r"),
             (_hub_error(404, "nope", "RemoteEntryNotFoundError"), r"not found \(HTTP 404\); check o/r"),
             (_hub_error(403, "gated", "GatedRepoError"), "is gated"),
             (_hub_error(401, "bad"), r"rejected the token \(HTTP 401\)"),
             (_hub_error(403, "no"), "may not write to o/r")]
    for exc, needle in cases:
        with pytest.raises(HubError, match=needle):
            call("reading", "o/r", fails(exc))
    from huggingface_hub.errors import OfflineModeIsEnabled

    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 is set"):
        call("reading", "o/r", fails(OfflineModeIsEnabled("offline")))
    with pytest.raises(HubUnavailableError) as err:
        call("reading", "o/r", fails(_hub_error(503, f"overloaded, Bearer {HF}")))
    assert HF not in str(err.value) and "after 1 tries" in str(err.value)
