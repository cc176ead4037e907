"""The evaluate flow on the tiny dataset: metrics per clip / split / category, the PoC report,
registration with promotion, and its bad inputs (an empty split, a registry without champion)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.evaluate import evaluate
from flows.evaluate import main as evaluate_cli
from storage import tracking
from storage.layout import DatasetRoot
from tasks.training.evaluate import EvaluationError, read_rows, split_rows, training_data_hashes
from tasks.training.registry import TRAINING_DATA_TAG
from tests.fixtures_models import write_config

pytestmark = pytest.mark.slow
NAME = "evaluate-test-model"


@pytest.fixture(scope="module")
def config_file(split_dataset, local_mlflow, tmp_path_factory) -> Path:
    """The tiny config, registering under this module's own model name."""
    return write_config(
        tmp_path_factory.mktemp("evaluate") / "tiny.yaml", split_dataset, local_mlflow, [f"registry.model_name={NAME}"]
    )


@pytest.fixture(scope="module")
def first_evaluation(logged_model, config_file):
    import torch

    torch.set_num_threads(1)
    return evaluate(model=logged_model, config=str(config_file), train_clips=1)


def test_metrics_rows_and_report(first_evaluation, split_dataset):
    summary = first_evaluation
    test = summary["metrics"]["test"]
    assert test["psnr_mask"] > 0 and 0 < test["ssim_mask"] <= 1 and test["warp_error"] is not None
    # No metric network is configured: those metrics say why instead of giving a number.
    for name in ("lpips", "clip_i", "dino", "fvd"):
        assert test[name] is None
    rows = read_rows(Path(summary["folder"]) / "test")
    expected = [r["clip_key"] for r in split_rows(split_dataset, "test", max_clips=2)]
    assert [r["clip_key"] for r in rows] == expected
    assert rows[0]["clip_i"]["unavailable"] and rows[0]["category"]
    assert (Path(summary["folder"]) / "test" / "videos" / f"{expected[0]}.mp4").is_file()
    assert len(read_rows(Path(summary["folder"]) / "train")) == 1

    client = MlflowClient()
    run = client.get_run(summary["evaluation_run_id"])
    assert run.data.metrics["test/psnr_mask"] == pytest.approx(test["psnr_mask"])
    assert any(key.startswith("test/category/") for key in run.data.metrics)
    report = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/report/poc_report.md")
    assert "unavailable" in report and "# PoC report" in report
    # The training run's loss curve reached the report: 3 points, too few to judge convergence.
    assert "3 loss values, need 10" in report and summary["verdict"] != "success"


def test_registers_version_with_metrics_and_training_data(first_evaluation, split_dataset):
    registry = first_evaluation["registry"]
    assert registry["registered"] and registry["version"] == "1" and registry["promoted"]
    client = MlflowClient()
    for alias in (tracking.CHAMPION, tracking.CHALLENGER):
        assert str(client.get_model_version_by_alias(NAME, alias).version) == "1"
    version = client.get_model_version(NAME, "1")
    assert float(version.tags["metric.psnr_mask"]) == pytest.approx(first_evaluation["metrics"]["test"]["psnr_mask"])
    assert version.tags["metric.clip_i"].startswith("unavailable")
    recorded = mlflow.artifacts.load_dict(f"runs:/{first_evaluation['evaluation_run_id']}/training_data.json")
    assert recorded["clips"] == training_data_hashes(split_dataset)
    assert version.tags[TRAINING_DATA_TAG]


def test_a_model_that_is_not_better_does_not_move_champion(first_evaluation, logged_model, config_file):
    # Same weights, same seed: equal on the primary metric, which is not "better".
    again = evaluate(model=logged_model, config=str(config_file), train_clips=0)
    assert again["registry"]["version"] == "2" and not again["registry"]["promoted"]
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, tracking.CHAMPION).version) == "1"
    assert str(client.get_model_version_by_alias(NAME, tracking.CHALLENGER).version) == "2"
    # Evaluating the champion itself does not add a version.
    champion = evaluate(model=f"models:/{NAME}@champion", config=str(config_file), train_clips=0)
    assert champion["registry"] == {
        "version": "1",
        "registered": False,
        "promoted": False,
        "reason": "already a registry version",
    }


def test_empty_split_is_a_clear_error(logged_model, config_file, split_dataset, tmp_path):
    rows = [r for r in DatasetRoot(split_dataset).read_manifest("dataset").to_pylist() if r["split"] != "test"]
    DatasetRoot.create(tmp_path / "no-test").write_manifest("dataset", rows)
    with pytest.raises(EvaluationError, match="split 'test' .* has no clips .*test 0.*rebuild the dataset"):
        evaluate(model=logged_model, config=str(config_file), dataset=str(tmp_path / "no-test"))


def test_registry_without_champion_is_a_clear_error(config_file):
    with pytest.raises(tracking.ModelNotFoundError, match="no version of nobody-registered-this has alias champion"):
        evaluate(model="models:/nobody-registered-this@champion", config=str(config_file))


def test_the_command_line_says_what_is_missing_in_one_line(config_file, tmp_path, capsys):
    for model, says in (
        ("models:/nobody-registered-this@champion", "no version of nobody-registered-this"),
        (f"base:{tmp_path / 'missing.yaml'}", "names no usable run config"),
    ):
        with pytest.raises(SystemExit) as stopped:
            evaluate_cli(["--model", model, "--config", str(config_file)])
        assert stopped.value.code == 2 and says in capsys.readouterr().err
