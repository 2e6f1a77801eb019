"""The house rules of docs/architecture.md, read from the code's own import graph.

- no import cycle between magpie_hub modules;
- no arrow from a stage to a later stage (recipe < chat < generate < build/dataset < tags < filters < card
  < hub); the shared modules (errors, layout, models, retry) import no stage;
- only the edges (CLI, pipeline, the datasets builder) import the model-reference providers (demo models,
  GGUF models); backends, tags and the chat format never do;
- a ``magpie_hub`` import inside a function says why, on its line or just above (a heavy import kept off
  CLI start).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "magpie_hub"
STAGES = {"recipe": 0, "chat": 1, "generate": 2, "build": 3, "dataset": 3, "tags": 4, "filters": 5, "card": 6,
          "hub": 7}
SHARED = {"magpie_hub", "magpie_hub.errors", "magpie_hub.layout", "magpie_hub.models", "magpie_hub.retry"}
PROVIDERS = {"magpie_hub.chat.demo_models", "magpie_hub.gguf_models"}
EDGES = {"magpie_hub.cli", "magpie_hub.pipeline", "magpie_hub.build.hf_builder", *PROVIDERS}
# The recipe configures every stage: it may read the backend registry (to validate each backend's typed
# options when the recipe loads), and nothing else of a later stage.
REGISTRIES = {"magpie_hub.generate.backends"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _target(name: str, imported: str | None) -> str:
    """The module an import statement reaches: ``from pkg import mod`` reaches ``pkg.mod`` when it is one."""
    if imported and f"{name}.{imported}" in MODULES:
        return f"{name}.{imported}"
    return name


def _imports(module: str) -> list[tuple[str, ast.stmt, bool]]:
    """(target module, statement, inside a function) for every magpie_hub import of ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child, in_function) for a in child.names if a.name.startswith("magpie_hub"))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("magpie_hub"):
                found.extend((_target(child.module, a.name), child, in_function) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


GRAPH = {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.get(parts[1]) if len(parts) > 1 else None


def test_the_graph_is_read():
    assert len(MODULES) > 40 and GRAPH["magpie_hub.pipeline"] >= {"magpie_hub.build.run", "magpie_hub.card.render"}


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            dfs(module)


def test_no_arrow_to_a_later_stage_and_shared_modules_import_no_stage():
    bad = []
    for module, targets in GRAPH.items():
        if module in EDGES:
            continue
        for target in targets:
            if target in PROVIDERS:
                continue  # checked below
            if module in SHARED and target not in SHARED:
                bad.append(f"{module} -> {target} (a shared module imports a stage)")
            own, other = _stage(module), _stage(target)
            if module.startswith("magpie_hub.recipe") and target in REGISTRIES:
                continue
            if own is not None and other is not None and other > own:
                bad.append(f"{module} -> {target} (an earlier stage imports a later one)")
    assert not bad, "\n".join(bad)


def test_only_edges_import_model_reference_providers():
    bad = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
           if t in PROVIDERS and m not in EDGES and m not in PROVIDERS]
    assert not bad, "\n".join(bad)


def test_imports_inside_functions_say_why():
    bad = []
    for module, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, stmt, in_function in _imports(module):
            said = any("#" in line for line in lines[max(0, stmt.lineno - 4):stmt.lineno])  # on it or just above
            if in_function and not said:
                bad.append(f"{module}:{stmt.lineno} imports {target} inside a function without saying why")
    assert not bad, "\n".join(bad)
