"""Row columns that follow the released MAGPIE datasets (magpie-align/magpie @ b734a36, exp/gen_res.py and
exp/gen_mt.py; the Magpie-Llama-3.1-Pro-MT dataset cards):

* ``instruction_k`` / ``response_k`` for k = 2..turns (``gen_mt.py`` writes ``item[f'instruction_{turn}']``):
  the same texts as ``conversations``; their number depends on the config's ``turns``, so the features are
  per config (:func:`magpie_hub.dataset.schema.build_features`);
* ``gen_response_configs``: how the responses were sampled (``gen_res.py`` records temperature, top_p,
  max_tokens, stop tokens, the generator and the engine). :func:`response_configs` builds it in one place:
  a build whose responses come from another model passes that model (and its stops) here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def turn_columns(turns: Sequence[tuple[str, str]], total: int) -> dict[str, str | None]:
    """``instruction_k`` / ``response_k`` for k = 2..``total`` (None where the conversation is shorter)."""
    out: dict[str, str | None] = {}
    for k in range(2, total + 1):
        pair = turns[k - 1] if k <= len(turns) else (None, None)
        out[f"instruction_{k}"], out[f"response_{k}"] = pair
    return out


def with_turn_columns(rows: Iterable[dict], total: int) -> Iterator[dict]:
    """``rows`` with ``instruction_k`` / ``response_k`` (k = 2..``total``) taken from their ``conversations``."""
    for row in rows:
        if total > 1:
            values = [m.get("value") for m in row.get("conversations") or ()]
            row.update(turn_columns(list(zip(values[0::2], values[1::2], strict=False)), total))
        yield row


def response_configs(params, *, model: str, stop: Sequence[str], engine: str | None) -> dict[str, Any]:
    """The ``gen_response_configs`` of a row: the response model, its sampling and stops, the backend."""
    return {
        "model": model,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "max_tokens": int(params.max_new_tokens),
        "stop": [str(s) for s in stop],
        "engine": engine,
    }


__all__ = ["response_configs", "turn_columns", "with_turn_columns"]
