"""The row schema of every generated config: typed with ``datasets.Features``, stable across backends.

Tag steps add columns (see :mod:`magpie_hub.tags`); the generation columns below never change name. A build
writes :data:`BUILD_FEATURES` (the generation columns + :data:`OUTCOME_FEATURES`).
"""

from __future__ import annotations

from datasets import Features, List, Value

GEN_INPUT_CONFIGS = {
    "temperature": Value("float64"),
    "top_p": Value("float64"),
    "seed": Value("int64"),
    "pre_query_template": Value("string"),
    "input_generator": Value("string"),
}

GENERATION_FEATURES = Features(
    {
        "uuid": Value("string"),
        "model": Value("string"),
        "gen_input_configs": GEN_INPUT_CONFIGS,
        "instruction": Value("string"),
        "response": Value("string"),
        "conversations": List({"from": Value("string"), "value": Value("string")}),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "turns": Value("int64"),
        "category": Value("string"),
    }
)

GENERATION_COLUMNS = tuple(GENERATION_FEATURES)

# How each kept turn ended, recorded by builds since the per-role truncation policy (datasets built before
# lack them, so readers treat them as optional): ``finish_reasons`` has one entry per message of
# ``messages`` ("stop", "length": cut at max_new_tokens, "loop": a degenerate loop cut after its first copy);
# ``truncated`` is true when any of them is not "stop" (a filter's ``truncated == false`` keeps complete rows).
OUTCOME_FEATURES = Features({"truncated": Value("bool"), "finish_reasons": List(Value("string"))})

# How the responses were sampled, as the released sets' ``gen_response_configs`` (generate/row_extras.py
# builds it: the response model, its sampling and stops, the backend).
GEN_RESPONSE_CONFIGS = {
    "model": Value("string"),
    "temperature": Value("float64"),
    "top_p": Value("float64"),
    "max_tokens": Value("int64"),
    "stop": List(Value("string")),
    "engine": Value("string"),
}

# The columns a build writes: the generation columns, then the outcome columns.
BUILD_FEATURES = Features({**GENERATION_FEATURES, **OUTCOME_FEATURES, "gen_response_configs": GEN_RESPONSE_CONFIGS})


def build_features(turns: int = 1, base: Features = BUILD_FEATURES) -> Features:
    """``base`` + ``instruction_k`` / ``response_k`` for k = 2..turns (multi-turn configs, as the released MT sets)."""
    extra = {f"{role}_{k}": Value("string") for k in range(2, turns + 1) for role in ("instruction", "response")}
    return Features({**base, **extra})
