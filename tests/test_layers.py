"""Layers import downward only (README, "Layout"): storage knows nothing of models, tasks or flows;
models nothing of tasks or flows; tasks/dataset nothing of tasks/training (training reads the
dataset, never the other way round); tasks nothing of flows; and flows import no flows (retrain
runs the other flows by entrypoint, flows/retrain.py). Every module of tasks/ is in one of its
two subpackages. Read from the source with ast, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("storage", "models", "tasks.dataset", "tasks.training", "flows")  # lowest first


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module `path` imports, and of every name a `from` import takes from a
    package (`from tasks import training` -> tasks, tasks.training); absolute imports only (the
    project has no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (tasks itself, the bare package, to none)."""
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def modules(root: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of the layers' packages under `root`."""
    found = {}
    for package in {layer.split(".")[0] for layer in LAYERS}:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def upward_imports(root: Path) -> list[str]:
    """'<file> imports <module>' for every import of a higher layer."""
    found = []
    for name, path in modules(root).items():
        layer = layer_of(name)
        if layer is None:
            continue
        for imported in sorted(imported_modules(path)):
            other = layer_of(imported)
            if other is not None and LAYERS.index(other) > LAYERS.index(layer):
                found.append(f"{path.relative_to(root)} imports {imported}")
    return found


def flow_to_flow_imports(root: Path) -> list[str]:
    return [
        f"{path.relative_to(root)} imports {imported}"
        for name, path in modules(root).items()
        if layer_of(name) == "flows"
        for imported in sorted(imported_modules(path))
        if layer_of(imported) == "flows"
    ]


def modules_outside_the_layers(root: Path) -> list[str]:
    """Modules of a layer package in no layer (e.g. tasks/x.py beside tasks/dataset and tasks/training)."""
    return [
        str(path.relative_to(root))
        for name, path in modules(root).items()
        if layer_of(name) is None and path.name != "__init__.py"
    ]


def test_no_layer_imports_a_higher_one():
    assert upward_imports(ROOT) == []


def test_flows_import_no_flows():
    assert flow_to_flow_imports(ROOT) == []


def test_every_module_of_tasks_is_in_dataset_or_training():
    assert modules_outside_the_layers(ROOT) == []
    assert {layer_of(name) for name in modules(ROOT)} == set(LAYERS) | {None}  # None: tasks/__init__.py


def test_the_checks_see_each_kind_of_violation(tmp_path):
    files = {
        "storage/ok.py": "import os\nfrom storage.errors import SystemicError\n",
        "storage/up.py": "def f():\n    from tasks.dataset import stage\n",
        "models/up.py": "import flows.train\n",
        "tasks/__init__.py": "",
        "tasks/loose.py": "",
        "tasks/dataset/up.py": "from tasks.training.run_config import RunConfig\n",
        "tasks/dataset/package.py": "from tasks import training\n",
        "tasks/training/down.py": "from tasks.dataset.stage import stage_task\nfrom storage import tracking\n",
        "flows/a.py": "from tasks.training.train import run_training\n",
        "flows/b.py": "def f():\n    from flows.a import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(upward_imports(tmp_path)) == [
        "models/up.py imports flows.train",
        "storage/up.py imports tasks.dataset",
        "storage/up.py imports tasks.dataset.stage",
        "tasks/dataset/package.py imports tasks.training",
        "tasks/dataset/up.py imports tasks.training.run_config",
        "tasks/dataset/up.py imports tasks.training.run_config.RunConfig",
    ]
    assert flow_to_flow_imports(tmp_path) == ["flows/b.py imports flows.a", "flows/b.py imports flows.a.x"]
    assert modules_outside_the_layers(tmp_path) == ["tasks/loose.py"]


@pytest.mark.parametrize("step", ["build_dataset", "train", "evaluate"])
def test_retrain_runs_the_flows_that_prefect_yaml_deploys(step):
    from prefect import Flow

    from flows.retrain import SUBFLOWS, subflow

    module, function = SUBFLOWS[step].split(":")
    entrypoints = {d["entrypoint"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert f"{module.replace('.', '/')}.py:{function}" in entrypoints
    assert isinstance(subflow(step), Flow) and subflow(step).name == step.replace("_", "-")
