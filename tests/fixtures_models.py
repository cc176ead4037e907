"""Fixtures of the evaluate / generate / retrain tests: an MLflow store and a logged tiny model.

The model is the tiny config's generator as initialised (no training: evaluate and generate do
not care how good it is), saved as a model folder and logged to an MLflow run with a short loss
curve, exactly as the train flow logs its model. The end-to-end test trains for real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest

from flows.evaluate import LOSS_METRIC
from models.transformer import ProductVideoGenerator
from storage import tracking
from tasks.training.model_store import resolve_model_config, save_model_folder
from tests.fixtures_dataset import TINY_BUILD_CONFIG, tiny_run_config

URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def build_split_dataset(folder: Path, num_products: int = 4, seed: int = 3) -> Path:
    """Synthetic pages (folder/source) -> a built dataset (folder/dataset) with train, val and test."""
    from demo.studio import StudioConfig, generate_studio
    from flows.build_dataset import build_dataset

    output = folder / "dataset"
    if not (output / "manifests" / "dataset.parquet").is_file():
        generate_studio(folder / "source", folder / "truth", StudioConfig.tiny(num_products=num_products, seed=seed))
        build_dataset(source=str(folder / "source"), output=str(output), config=str(TINY_BUILD_CONFIG))
    return output


@pytest.fixture(scope="session")
def split_dataset(tmp_path_factory) -> Path:
    """A tiny built dataset with clips in every split, shared by the evaluate/generate/retrain tests."""
    return build_split_dataset(tmp_path_factory.getbasetemp() / "split-dataset")


@pytest.fixture(scope="session")
def local_mlflow(tiny_data_dir):
    """MLflow on the session's data dir (the URI variables unset for the session, then restored)."""
    saved = {name: os.environ.pop(name, None) for name in URI_VARIABLES}
    tracking.setup_mlflow("product-video-generator", tiny_data_dir)
    yield tiny_data_dir
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def write_config(path: Path, dataset: Path, data_dir: Path, overrides: list[str] = ()) -> Path:
    """configs/tiny.yaml for this dataset + data dir, as a file (what the flows take)."""
    path.write_text(tiny_run_config(dataset, data_dir, ["evaluate.max_clips=2", *overrides]).to_yaml())
    return path


@pytest.fixture(scope="session")
def tiny_config_file(split_dataset, local_mlflow, tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("config") / "tiny.yaml", split_dataset, local_mlflow)


def log_untrained_model(config_file: Path, folder: Path, losses=(1.0, 0.9, 0.8)) -> str:
    """Save the tiny generator as initialised into a model folder, log it to a new MLflow run at
    artifact path `model` with a loss curve; return `runs:/<id>/model`."""
    from tasks.training.run_config import load_run_config

    run_config = load_run_config(config_file)
    cfg = resolve_model_config(run_config.model, run_config.mlflow.data_dir)
    generator = ProductVideoGenerator.from_model_config(cfg)
    save_model_folder(
        folder,
        generator,
        run_config,
        adapter_only=False,
        info={"stage": 2, "step": len(losses), "dataset_root": run_config.data.root},
    )
    experiment_id = tracking.setup_mlflow(run_config.mlflow.experiment, run_config.mlflow.data_dir)
    with mlflow.start_run(experiment_id=experiment_id, run_name="fixture-train") as run:
        for step, loss in enumerate(losses):
            mlflow.log_metric(LOSS_METRIC, loss, step=step)
        mlflow.log_artifacts(str(folder), "model")
    return f"runs:/{run.info.run_id}/model"


@pytest.fixture(scope="session")
def logged_model(tiny_config_file, tmp_path_factory) -> str:
    """`runs:/<id>/model` of the untrained tiny model (logged once per session, see trained_champion)."""
    remembered = tmp_path_factory.getbasetemp() / "logged-model.txt"
    if not remembered.is_file():
        remembered.write_text(log_untrained_model(tiny_config_file, tmp_path_factory.mktemp("model") / "model"))
    return remembered.read_text()


@pytest.fixture(scope="session")
def trained_champion(split_dataset, local_mlflow, tmp_path_factory) -> dict:
    """precompute -> train (a few steps of each stage) -> evaluate -> register, under its own
    registry name: {"config": file, "registry_name", "train": train result, "evaluation": ...}.

    Done once per session and remembered in a file: a session fixture imported into several
    test modules is set up once per module.
    """
    import torch

    from flows.evaluate import evaluate
    from flows.train import train

    folder = tmp_path_factory.getbasetemp() / "e2e"
    remembered = folder / "result.json"
    if remembered.is_file():
        return json.loads(remembered.read_text()) | {"config": folder / "tiny.yaml"}
    folder.mkdir()
    torch.set_num_threads(1)
    name = "e2e-product-video-generator"
    config = write_config(folder / "tiny.yaml", split_dataset, local_mlflow, [f"registry.model_name={name}"])
    trained = train(config=str(config))
    evaluation = evaluate(model=trained["model_uri"], config=str(config), train_clips=1)
    result = {"registry_name": name, "train": trained, "evaluation": evaluation}
    remembered.write_text(json.dumps(result, default=str))
    return result | {"config": config}
