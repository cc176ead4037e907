"""Test-wide settings: flows run against one temporary Prefect server and database per session,
never the user's, and MLflow defaults to a temporary data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

# Session fixtures are defined here once: imported into several test modules instead, each module
# would get its own instance (its own data dir and MLflow store), and results would depend on the
# order the modules run in. Imported to be registered, so unused here (F401).
from tests.fixtures_dataset import tiny_data_dir, tiny_dataset  # noqa: F401
from tests.fixtures_models import local_mlflow, logged_model, split_dataset, tiny_config_file, trained_champion  # noqa: F401


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    """configs/model/tiny.yaml with its tiny components saved to a temporary folder."""
    from models.config import load_model_config
    from models.tiny import materialize_tiny

    return materialize_tiny(
        load_model_config(Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml"),
        tmp_path_factory.mktemp("tiny_wan"),
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny ops on a shared 2-core box: two OpenMP threads spin against each other (~70x slower).
    Modules that run torch ask for it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def prefect_test_server(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=120):
        yield
