"""MLflow tracking defaults and the registry round trip: register, promote by alias, resolve.

The local SQLite store is created once per module (its migrations take seconds); each test uses
its own registered-model name. The server test repeats the round trip against `mlflow server`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest

from storage import tracking
from tasks.training.registry import promote_if_better, promotion

BIN = Path(sys.executable).parent
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(scope="module")
def isolated_mlflow():
    """Unset the MLflow URI variables for the module and restore them (and MLflow's globals) after."""
    saved = {name: os.environ.pop(name, None) for name in URI_VARIABLES}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value
    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])


@pytest.fixture(scope="module")
def local_store(isolated_mlflow, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    experiment_id = tracking.setup_mlflow("tests", data_dir)
    return data_dir, experiment_id


def _log_checkpoint(tmp_path: Path, marker: str) -> str:
    """A run whose artifacts hold a checkpoint folder (as the trainer logs it); returns the run id."""
    folder = tmp_path / f"checkpoint-{marker}"
    folder.mkdir()
    (folder / "model_index.json").write_text(f'{{"marker": "{marker}"}}')
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "checkpoint")
    return run.info.run_id


def _round_trip(tmp_path: Path, name: str) -> None:
    """Register two versions; champion moves only when the newer one is better; resolve both."""
    with pytest.raises(tracking.ModelNotFoundError, match=f"no version of {name} has alias champion yet"):
        tracking.resolve_model_uri(f"models:/{name}@champion")

    first = tracking.register_model_version(
        _log_checkpoint(tmp_path, "a"),
        "checkpoint",
        {"psnr_mask": 24.0, "clip_i": {"unavailable": "no weights"}},
        name=name,
    )
    decision = promote_if_better(name, first, "psnr_mask")
    assert decision["promoted"] and decision["reason"] == "there was no champion yet"
    assert tracking.version_metrics(name, first) == {"psnr_mask": 24.0}

    worse = tracking.register_model_version(
        _log_checkpoint(tmp_path, "b"), "checkpoint", {"psnr_mask": 23.0}, name=name
    )
    decision = promote_if_better(name, worse, "psnr_mask")
    assert not decision["promoted"] and "does not beat" in decision["reason"]
    assert decision["champion_version"] == first
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == first
    assert str(client.get_model_version_by_alias(name, "challenger").version) == worse
    assert client.get_model_version(name, worse).tags["promotion.promoted"] == "false"

    champion = tracking.resolve_model_uri(f"models:/{name}@champion", tmp_path / "champion")
    assert '"a"' in (champion / "model_index.json").read_text()
    challenger = tracking.resolve_model_uri(f"models:/{name}@challenger", tmp_path / "challenger")
    assert '"b"' in (challenger / "model_index.json").read_text()

    better = tracking.register_model_version(
        _log_checkpoint(tmp_path, "c"), "checkpoint", {"psnr_mask": 26.5}, name=name
    )
    decision = promote_if_better(name, better, "psnr_mask")
    assert decision["promoted"] and "beats" in decision["reason"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == better


def test_default_tracking_is_sqlite_under_the_data_dir(local_store):
    data_dir, experiment_id = local_store
    assert mlflow.get_tracking_uri() == f"sqlite:///{data_dir.resolve()}/mlflow/mlflow.db"
    assert (data_dir / "mlflow" / "mlflow.db").is_file()
    experiment = mlflow.MlflowClient().get_experiment(experiment_id)
    assert experiment.artifact_location == (data_dir.resolve() / "mlflow" / "artifacts").as_uri()
    assert tracking.setup_mlflow("tests", data_dir) == experiment_id  # idempotent


def test_tracking_uri_prefers_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5999"
    assert not (tmp_path / "mlflow").exists()


def test_register_promote_and_resolve_on_the_local_store(local_store, tmp_path):
    _round_trip(tmp_path, "local-round-trip")
    assert tracking.DEFAULT_MODEL_URI == "models:/product-video-generator@champion"


def test_lower_is_better_and_missing_primary_metric(local_store, tmp_path):
    name = "lower-is-better"
    first = tracking.register_model_version(_log_checkpoint(tmp_path, "a"), "checkpoint", {"fvd": 300.0}, name=name)
    assert promote_if_better(name, first, "fvd", higher_is_better=False)["promoted"]
    second = tracking.register_model_version(_log_checkpoint(tmp_path, "b"), "checkpoint", {"fvd": 250.0}, name=name)
    assert promote_if_better(name, second, "fvd", higher_is_better=False)["promoted"]
    third = tracking.register_model_version(
        _log_checkpoint(tmp_path, "c"), "checkpoint", {"fvd": {"unavailable": "no VideoMAE weights"}}, name=name
    )
    decision = promote_if_better(name, third, "fvd", higher_is_better=False)
    assert not decision["promoted"] and "has no value for fvd" in decision["reason"]


def test_the_promotion_rule():
    assert promotion("1", 24.0, None, None, "psnr_mask") == (True, "there was no champion yet")
    assert promotion("2", 25.0, "1", 24.0, "psnr_mask")[0]
    assert not promotion("2", 24.0, "1", 24.0, "psnr_mask")[0]  # a tie keeps the champion
    assert promotion("2", 250.0, "1", 300.0, "fvd", higher_is_better=False)[0]
    assert not promotion("2", float("nan"), "1", 24.0, "psnr_mask")[0]
    assert "no psnr_mask to compare with" in promotion("2", 25.0, "1", None, "psnr_mask")[1]
    assert promotion("1", 25.0, "1", 25.0, "psnr_mask") == (False, "version 1 already is the champion")


def test_resolve_local_folder_and_missing_things(local_store, tmp_path):
    assert tracking.resolve_model_uri(str(tmp_path)) == tmp_path
    with pytest.raises(tracking.ModelNotFoundError, match="neither a model URI"):
        tracking.resolve_model_uri(str(tmp_path / "nothing"))
    with pytest.raises(tracking.ModelNotFoundError, match="no version of never-registered"):
        tracking.resolve_model_uri("models:/never-registered@champion")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.server
def test_round_trip_against_a_real_mlflow_server(isolated_mlflow, tmp_path, monkeypatch):
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [
            BIN / "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        # The job executor (huey workers) is not needed and slows the start down.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not become healthy in 60 s"
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        data_dir = tmp_path / "data"
        experiment_id = tracking.setup_mlflow("server-tests", data_dir)
        assert mlflow.get_tracking_uri() == url and not (data_dir / "mlflow").exists()
        assert mlflow.MlflowClient().get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
        _round_trip(tmp_path, tracking.MODEL_NAME)
        assert any((tmp_path / "server-artifacts").rglob("model_index.json"))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
