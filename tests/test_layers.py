"""Layers import downward only: storage knows nothing of models, tasks or flows; models nothing of
tasks or flows; tasks nothing of flows (README, "Layout"). Read from the source with ast, imports
inside functions included. (flows/retrain.py still composes the other flows as subflows; moving
that below the flows is issue 15's.)"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("storage", "models", "tasks", "flows")  # lowest first


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (absolute imports; the project has no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_layer_imports_a_higher_one(layer):
    higher = set(LAYERS[LAYERS.index(layer) + 1:])
    upward = {f"{path.relative_to(ROOT)} imports {sorted(imported_packages(path) & higher)}"
              for path in sorted((ROOT / layer).rglob("*.py")) if imported_packages(path) & higher}
    assert upward == set()


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from flows.train import train\n")
    assert imported_packages(module) == {"flows"}
