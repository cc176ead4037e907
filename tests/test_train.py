"""The train flow on the tiny dataset: both stages, MLflow contents, model folder, wrong-config
checkpoints, and resume after SIGKILL onto the same loss curve and MLflow run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_URL

from flows.train import train
from storage.tracking import tracking_uri
from tasks.training.model_store import IncompatibleCheckpointError, load_model_folder, read_model_card
from tests.fixtures_dataset import REPO, TINY_CONFIG

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


FEW_STEPS = ("train.stage1.max_steps=2", "train.stage2.max_steps=2")


def overrides(dataset, data_dir, *extra):
    return [f"data.root={dataset}", f"mlflow.data_dir={data_dir}", f"train.runs_dir={data_dir / 'runs'}", *extra]


def losses(client, run_id):
    """step -> loss; a resumed run logs the steps after its checkpoint again (same values): last wins."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)}


def artifacts(client, run_id, path=""):
    found = []
    for entry in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return found


@pytest.fixture(scope="module")
def client(tiny_data_dir):
    uri = tracking_uri(tiny_data_dir)
    return MlflowClient(uri, uri)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tiny_data_dir):
    # A tiny run lasts about a second; sample often enough that the run logs system metrics.
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.1"
    try:
        return train(config=str(TINY_CONFIG), overrides=overrides(tiny_dataset, tiny_data_dir, *FEW_STEPS))
    finally:
        del os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]


def test_both_stages_train_and_mlflow_has_params_metrics_and_artifacts(trained, client):
    run = client.get_run(trained["run_id"])
    assert run.info.status == "FINISHED" and trained["global_step"] == 4 and trained["stage"] == 2
    assert run.data.params["train.stage1.learning_rate"] == "0.001" and run.data.params["model.base_model"] == "tiny"
    curve = losses(client, trained["run_id"])
    assert sorted(curve) == [1, 2, 3, 4] and all(map(torch.isfinite, torch.tensor(list(curve.values()))))
    stages = {m.step: m.value for m in client.get_metric_history(trained["run_id"], "stage")}
    assert stages == {1: 1.0, 2: 1.0, 3: 2.0, 4: 2.0}
    assert {"lr", "throughput_samples_per_s"} <= set(run.data.metrics)
    gates = [m.value for m in client.get_metric_history(trained["run_id"], "reference_gate_abs_mean")]
    assert len(gates) == 4 and gates[-1] > 0  # the gates start at 0 and open as the adapter trains
    assert {"loss_inside_mask", "loss_outside_mask"} <= set(run.data.metrics)
    assert any(name.startswith("system/") for name in run.data.metrics), "no system metrics logged"
    logged = artifacts(client, trained["run_id"])
    assert {
        "samples/stage1-epoch001.mp4",
        "samples/stage1-epoch001.png",
        "samples/stage2-epoch001.mp4",
        "samples/stage2-epoch001.png",
        "model/run_config.yaml",
        "model/model_card.json",
        "checkpoints/step-000002/trainable.safetensors",
        "checkpoints/step-000004/state.pt",
    } <= set(logged)


def test_the_logged_model_folder_loads_with_the_trained_weights(trained, tiny_data_dir):
    generator, cfg = load_model_folder(trained["model_uri"])
    local, _ = load_model_folder(trained["model_dir"])
    card = read_model_card(trained["model_dir"])
    assert (card["stage"], card["step"], card["adapter_only"]) == (2, 4, False) and cfg.name == "tiny"
    gate = "transformer.wan.blocks.0.attn1.processor.gate"
    assert torch.equal(generator.state_dict()[gate], local.state_dict()[gate])
    assert generator.state_dict()[gate].abs().sum() > 0  # the gates moved: the adapter trained


def test_a_finished_run_started_again_returns_its_result(trained, tiny_dataset, tiny_data_dir):
    again = train(config=str(TINY_CONFIG), overrides=overrides(tiny_dataset, tiny_data_dir, *FEW_STEPS))
    assert {k: again[k] for k in trained if k != "precompute"} == {k: trained[k] for k in trained if k != "precompute"}
    assert again["precompute"]["ran"] == 0


def test_a_checkpoint_of_another_config_is_refused(trained, tiny_dataset, tiny_data_dir):
    name = os.path.basename(trained["run_dir"])
    with pytest.raises(IncompatibleCheckpointError, match="another run config"):
        train(
            config=str(TINY_CONFIG),
            overrides=overrides(
                tiny_dataset, tiny_data_dir, f"train.run_name={name}", "train.stage1.learning_rate=0.5"
            ),
        )


KILL_RUN = (
    "train.stage1.max_steps=6",
    "train.stage2.max_steps=4",
    "train.checkpoint_every=2",
    "train.sample_every_epoch=0",
)


def test_a_killed_run_resumes_into_the_same_mlflow_run_and_loss_curve(tiny_dataset, tiny_data_dir, client):
    killed = overrides(tiny_dataset, tiny_data_dir, "train.run_name=killed", *KILL_RUN)
    run_dir = tiny_data_dir / "runs" / "killed"
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "flows.train", "--config", str(TINY_CONFIG)]
    command += [arg for override in killed for arg in ("--set", override)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not list(run_dir.glob("checkpoints/step-*")):
            assert process.poll() is None, f"training died: {process.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    checkpoint = sorted(run_dir.glob("checkpoints/step-*"))[-1]
    killed_at = int(checkpoint.name.split("-")[1])
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]

    resumed = train(config=str(TINY_CONFIG), overrides=killed)
    reference = train(
        config=str(TINY_CONFIG),
        overrides=overrides(tiny_dataset, tiny_data_dir, "train.run_name=uninterrupted", *KILL_RUN),
    )
    total = reference["global_step"]
    assert resumed["run_id"] == run_id and resumed["resumed_from_step"] == killed_at < total
    assert resumed["global_step"] == total and client.get_run(run_id).info.status == "FINISHED"
    expected, found = losses(client, reference["run_id"]), losses(client, run_id)
    assert sorted(found) == sorted(expected) == list(range(1, total + 1))
    for step in range(1, total + 1):
        assert found[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
