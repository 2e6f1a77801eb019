"""The row schema of every generated config: typed with ``datasets.Features``, stable across backends.

Tag steps add columns (see :mod:`magpie_hub.tags`); the generation columns below never change name.
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
