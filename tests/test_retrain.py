"""retrain: no champion -> clear error; the refresh builds with the config the dataset records;
no new data -> nothing done (said so); changed data -> fine-tune from the champion, evaluate,
register."""

from __future__ import annotations

import re
import shutil

import pytest
from mlflow.tracking import MlflowClient

from flows.retrain import retrain
from storage import tracking
from storage.config_files import ConfigError
from storage.layout import DatasetRoot
from tasks.training.registry import data_changes
from tests.fixtures_models import write_config

pytestmark = pytest.mark.slow


def test_no_champion_is_a_clear_error(split_dataset, local_mlflow, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", split_dataset, local_mlflow, ["registry.model_name=never-trained"])
    with pytest.raises(tracking.ModelNotFoundError, match="never-trained has no champion to fine-tune"):
        retrain(config=str(config), refresh_dataset=False)


def test_a_dataset_that_records_no_build_config_is_a_clear_error(split_dataset, local_mlflow, tmp_path):
    copy = tmp_path / "dataset"
    shutil.copytree(split_dataset, copy, ignore=shutil.ignore_patterns(".cache", "build.yaml"))
    config = write_config(tmp_path / "tiny.yaml", copy, local_mlflow)
    with pytest.raises(
        ConfigError, match=re.escape(f"dataset {copy} records no build config (build.yaml), so retrain cannot")
    ):
        retrain(source=str(split_dataset.parent / "source"), config=str(config))
    assert not (copy / "build.yaml").exists()  # nothing was built with a guessed config


def test_no_new_data_does_nothing(trained_champion, split_dataset):
    # The refresh re-runs build-dataset on the same source with the config the dataset records
    # (configs/dataset/tiny.yaml): every item comes from the cache, nothing is new. Any other
    # config (the default one's Grounding DINO, the demo's 480x720 clips) would run stages again.
    result = retrain(source=str(split_dataset.parent / "source"), config=str(trained_champion["config"]))
    assert result["dataset"]["config"] == "tiny" and result["dataset"]["config_changes"] == []
    assert all(w["ran"] == 0 and w["cached"] > 0 for w in result["dataset"]["task_runs"].values())
    assert not result["retrained"] and result["reason"].startswith("No new data: 0 new and 0 changed")
    name = trained_champion["registry_name"]
    assert len(MlflowClient().search_model_versions(f"name='{name}'")) == 1


def test_changed_data_fine_tunes_the_champion(trained_champion, split_dataset, tmp_path):
    copy = tmp_path / "dataset"
    shutil.copytree(split_dataset, copy, ignore=shutil.ignore_patterns(".cache"))
    root = DatasetRoot(copy)
    rows = root.read_manifest("dataset").to_pylist()
    changed = next(r for r in rows if r["split"] == "train")
    changed["caption"] += " on a wooden table"
    root.write_manifest("dataset", rows)
    name = trained_champion["registry_name"]
    champion = MlflowClient().get_model_version_by_alias(name, tracking.CHAMPION)
    assert data_changes(champion, str(copy)) == {
        "new": [],
        "changed": [changed["clip_key"]],
        "removed": [],
        "known": True,
    }

    result = retrain(dataset=str(copy), config=str(trained_champion["config"]), refresh_dataset=False)
    assert result["retrained"] and "0 new and 1 changed" in result["reason"]
    assert result["train"]["global_step"] > 0
    run = MlflowClient().get_run(result["train"]["run_id"])
    assert run.info.run_id != trained_champion["train"]["run_id"]
    version = result["evaluation"]["registry"]["version"]
    assert str(MlflowClient().get_model_version_by_alias(name, tracking.CHALLENGER).version) == version
