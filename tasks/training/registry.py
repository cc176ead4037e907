"""The model registry's rules, on top of storage.tracking's MLflow access.

- Promotion: the newest registered version gets alias `challenger`; `champion` moves to it only
  when it is strictly better on the primary metric (or there is no champion yet). The decision
  is `promotion` (pure), applied and recorded on the version by `promote_if_better`.
- Training data: the evaluate flow records, per registered version, the training split it was
  trained on ({clip_key: content hash}, tasks.training.evaluate.training_data_hashes) as an
  artifact of its evaluation run; retrain compares the dataset with that record (`data_changes`)
  to decide whether there is new data.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from storage import tracking
from storage.hashing import sha256_json
from tasks.training.evaluate import training_data_hashes

TRAINING_DATA_ARTIFACT = "training_data.json"
TRAINING_DATA_TAG = "training_data.fingerprint"
TRAINING_DATA_RUN_TAG = "training_data.run_id"  # the run whose artifacts hold TRAINING_DATA_ARTIFACT


def promotion(
    version: str,
    challenger_value: float | None,
    champion_version: str | None,
    champion_value: float | None,
    primary_metric: str,
    higher_is_better: bool = True,
) -> tuple[bool, str]:
    """Whether `version` (the challenger) becomes champion, and why.

    "Beats" means strictly better on `primary_metric`; with no champion yet the challenger becomes
    champion; a challenger or champion without that metric (unavailable) leaves the champion where
    it is.
    """
    better = "higher" if higher_is_better else "lower"
    if champion_version == version:
        return False, f"version {version} already is the champion"
    if challenger_value is None or math.isnan(challenger_value):
        return False, f"version {version} has no value for {primary_metric}"
    if champion_version is None:
        return True, "there was no champion yet"
    if champion_value is None:
        return False, (
            f"champion version {champion_version} has no {primary_metric} "
            "to compare with; move the alias by hand if intended"
        )
    if (challenger_value > champion_value) if higher_is_better else (challenger_value < champion_value):
        return True, (
            f"{primary_metric} {challenger_value:.4g} beats champion version "
            f"{champion_version}'s {champion_value:.4g} ({better} is better)"
        )
    return False, (
        f"{primary_metric} {challenger_value:.4g} does not beat champion "
        f"version {champion_version}'s {champion_value:.4g} ({better} is better)"
    )


def promote_if_better(name: str, version: str | int, primary_metric: str, higher_is_better: bool = True) -> dict:
    """Set `challenger` on `version`; move `champion` to it only if it beats the champion (`promotion`).

    The decision and its reason are returned and recorded as tags on the version.
    """
    client = MlflowClient()
    version = str(version)
    client.set_registered_model_alias(name, tracking.CHALLENGER, version)
    challenger_value = tracking.version_metrics(name, version, client).get(primary_metric)
    champion_version = tracking.alias_version(client, name, tracking.CHAMPION)
    champion_value = (
        tracking.version_metrics(name, champion_version, client).get(primary_metric)
        if champion_version is not None
        else None
    )
    promoted, reason = promotion(
        version, challenger_value, champion_version, champion_value, primary_metric, higher_is_better
    )
    if promoted:
        client.set_registered_model_alias(name, tracking.CHAMPION, version)
    decision = {
        "name": name,
        "version": version,
        "primary_metric": primary_metric,
        "higher_is_better": higher_is_better,
        "challenger_value": challenger_value,
        "champion_version": champion_version,
        "champion_value": champion_value,
        "promoted": promoted,
        "reason": reason,
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    client.set_model_version_tag(name, version, "promotion.promoted", str(promoted).lower())
    client.set_model_version_tag(name, version, "promotion.reason", reason)
    return decision


def record_training_data(run_id: str, dataset_root: str | Path) -> str:
    """Log {clip_key: content hash} of the training split at `dataset_root` to run `run_id`
    (artifact TRAINING_DATA_ARTIFACT); return its fingerprint (version tag TRAINING_DATA_TAG)."""
    hashes = training_data_hashes(dataset_root)
    MlflowClient().log_dict(run_id, {"dataset_root": str(dataset_root), "clips": hashes}, TRAINING_DATA_ARTIFACT)
    return sha256_json(hashes)


def data_changes(version, dataset_root: str) -> dict:
    """Train clips of the dataset that registry `version` has not seen: {"new", "changed", "removed",
    "known": bool (False when the version has no record of its training data)}."""
    current = training_data_hashes(dataset_root)
    record_run = version.tags.get(TRAINING_DATA_RUN_TAG)
    if not record_run:
        return {"new": sorted(current), "changed": [], "removed": [], "known": False}
    seen = mlflow.artifacts.load_dict(f"runs:/{record_run}/{TRAINING_DATA_ARTIFACT}")["clips"]
    return {
        "new": sorted(set(current) - set(seen)),
        "changed": sorted(k for k in set(current) & set(seen) if current[k] != seen[k]),
        "removed": sorted(set(seen) - set(current)),
        "known": True,
    }
