"""Fixtures that provide a built tiny dataset and a project data directory (for the precompute,
train, evaluate, retrain and generate tests).

tests/conftest.py registers the fixtures for every test: request them by name and do not import
them into a test module (an importing module would get instances of its own). The dataset is
built once per test session into a fixed folder under pytest's base temp dir and reused by every
test that requests it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.training.run_config import RunConfig, load_run_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# build-dataset's config for the tiny sources: classic backends, 96x144 clips of 1-3 s, and 4
# products split 2:1:1, so train, val and test each have clips (8:1:1 would put all in train).
TINY_BUILD_CONFIG = REPO / "configs" / "dataset" / "tiny.yaml"
NUM_PRODUCTS = 4


def build_tiny_dataset(folder: Path, num_products: int = NUM_PRODUCTS, seed: int = 3) -> Path:
    """Synthetic product pages -> build-dataset (configs/dataset/tiny.yaml)."""
    from demo.studio import StudioConfig, generate_studio
    from flows.build_dataset import build_dataset

    output = folder / "dataset"
    if (output / "manifests" / "dataset.parquet").is_file():
        return output
    generate_studio(folder / "source", folder / "truth", StudioConfig.tiny(num_products=num_products, seed=seed))
    build_dataset(source=str(folder / "source"), output=str(output), config=str(TINY_BUILD_CONFIG))
    return output


def tiny_run_config(dataset: Path, data_dir: Path, overrides: list[str] = ()) -> RunConfig:
    """configs/tiny.yaml pointed at `dataset`, with runs and MLflow under `data_dir`."""
    return load_run_config(
        TINY_CONFIG,
        [f"data.root={dataset}", f"mlflow.data_dir={data_dir}", f"train.runs_dir={data_dir / 'runs'}", *overrides],
    )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A built tiny dataset (train / val / test splits), shared by every module that asks for it."""
    return build_tiny_dataset(tmp_path_factory.getbasetemp() / "tiny-dataset")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A project data directory (MLflow store, runs, tiny model components) for the session."""
    folder = tmp_path_factory.getbasetemp() / "project-data"
    folder.mkdir(exist_ok=True)
    return folder
