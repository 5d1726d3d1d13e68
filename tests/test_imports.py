"""The package's import graph: no cycles, and ``config/`` at the bottom.

Every ``import`` and ``from ... import`` of ``asymoe_train``'s modules counts, also those inside functions (a lazy
import that closes a cycle still ties the two modules together)."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "asymoe_train")

# Strongly connected groups of modules tolerated for now, each with the reason.
# What config/ must never import: the layers built on it.
ABOVE_CONFIG = ("models", "moe", "data", "training", "distributed", "checkpoint", "evaluation", "observability",
                "cli", "plan", "train", "export")


def module_names() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(root, file)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        edges = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "asymoe_train.config.schema" in graph["asymoe_train.config.validate"]
    # asymoe_train/__init__.py imports export only inside a function
    assert "asymoe_train.export" in graph["asymoe_train"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_the_package_has_no_import_cycle():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles: {found}"


@pytest.mark.parametrize("module", sorted(m for m in module_names() if m.startswith("asymoe_train.config")))
def test_config_imports_nothing_from_the_layers_above_it(module):
    upward = sorted(t for t in import_graph()[module]
                    if t.split(".")[1] in ABOVE_CONFIG or t in ("asymoe_train", "asymoe_train.modality"))
    assert not upward, f"{module} imports {upward}; config/ is the bottom layer"


@pytest.mark.parametrize("root", ["asymoe_train.export", "asymoe_train.evaluation.generate",
                                  "asymoe_train.evaluation.vqa", "asymoe_train.checkpoint.weights"])
def test_weights_export_and_evaluation_do_not_reach_training(root):
    graph, seen, todo = import_graph(), set(), [root]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert not sorted(m for m in seen if m.startswith("asymoe_train.training")), f"{root} reaches training/"
