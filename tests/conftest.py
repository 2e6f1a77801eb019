"""Test isolation (autouse) and shared fixtures.

Set at import time, before any test imports huggingface_hub/datasets (both read these at import):
HF_HOME and the magpie-hub cache go to a fresh temporary directory, no token leaks in from the
developer's machine, and the process is offline. Tests that talk to the local Hub/TGI servers run
the client in a subprocess with :func:`cli_env` (offline mode blocks even 127.0.0.1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tokenizer folders shipped with the tests: permissively licensed ones copied, the others re-expressed
# (our own templates rendering byte-identically); each folder's SOURCE.txt says which and under what licence.
FIXTURES = ROOT / "tests" / "data" / "tokenizers"

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="magpie-hub-tests-"))
os.environ["HF_HOME"] = str(_SESSION_TMP / "hf_home")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["MAGPIE_HUB_CACHE"] = str(_SESSION_TMP / "magpie_cache")
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "MAGPIE_TGI_ENDPOINT"):
    os.environ.pop(_var, None)

# Tests are an edge (like the CLI): importing the demo / GGUF models registers their references. After the
# environment above, since huggingface_hub reads it at import.
import magpie_hub.gguf_models  # noqa: E402,F401
from magpie_hub.chat.demo_models import build_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    """Each test runs in its own cwd (no stray .env is read) with no token in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield


def cli_env(*, online: bool = False, **extra: str) -> dict[str, str]:
    """Environment for a ``magpie-hub`` subprocess. ``online=True`` drops HF_HUB_OFFLINE so the
    client may reach a local server on 127.0.0.1 (tests never reach anything else)."""
    env = dict(os.environ)
    if online:
        env.pop("HF_HUB_OFFLINE", None)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m magpie_hub.cli ARGS`` and capture its output as text."""
    proc = subprocess.run(
        [sys.executable, "-m", "magpie_hub.cli", *args],
        env=env or cli_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"magpie-hub {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"test fixtures missing: {FIXTURES} (part of the repository: restore tests/data/tokenizers)")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_llama3(fixtures_dir) -> Path:
    """A tiny random-weight Llama-3-style model with the Apr-2024 Llama-3 template format (from the fixture)."""
    return build_tiny_model("llama3", chat_template_from=fixtures_dir / "llama-3-8b-instruct")


@pytest.fixture(scope="session")
def tiny_qwen(fixtures_dir) -> Path:
    """A tiny random-weight model with the real Qwen2.5 tokenizer and chat template (from the fixture)."""
    return build_tiny_model("qwen2.5", tokenizer_from=fixtures_dir / "qwen2.5-instruct")


def tiny_reward_model(base: Path, out: Path, labels: int = 1) -> Path:
    """A seeded random-weight sequence-classification head (``labels`` outputs) on ``base``'s config and
    tokenizer, saved to ``out``: the reward-model stand-in of the reward and preference tests."""
    import torch  # heavy: only the tests that build a reward model pay for it
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(base)
    config.num_labels = labels
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out
