"""MLflow access: where runs are tracked, the model registry, aliases and model resolution.

Tracking: MLFLOW_TRACKING_URI when set (a real `mlflow server`, which then decides where artifacts
go), else a SQLite database under the project's data directory with artifacts next to it
(MLflow's file store is deprecated). The registry lives in the same store.

Registry: every evaluated model becomes a version of `product-video-generator`, registered from
the run's checkpoint folder, with its metrics as version tags `metric.<name>`; aliases name
versions (`challenger`, `champion`; MLflow 3 deprecates stages). Which version becomes champion
is a rule of the pipeline, not of the data contract: tasks/training/registry.py.
`models:/product-video-generator@champion` is what generate and evaluate load by default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

MODEL_NAME = "product-video-generator"
CHAMPION, CHALLENGER = "champion", "challenger"
DEFAULT_MODEL_URI = f"models:/{MODEL_NAME}@{CHAMPION}"
METRIC_TAG_PREFIX = "metric."


class ModelNotFoundError(LookupError):
    """The requested registered model / alias / version does not exist; the message says what to do."""


def _mlflow_dir(data_dir: str | Path) -> Path:
    return Path(data_dir).resolve() / "mlflow"


def tracking_uri(data_dir: str | Path = "data") -> str:
    """MLFLOW_TRACKING_URI if set, else sqlite:///<abs data_dir>/mlflow/mlflow.db (folder created)."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    folder = _mlflow_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def setup_mlflow(experiment: str, data_dir: str | Path = "data") -> str:
    """Point MLflow (tracking + registry) at `tracking_uri(data_dir)`, select `experiment`, return its id.

    A new experiment on the local default store keeps its artifacts under
    <data_dir>/mlflow/artifacts (MLflow would otherwise write ./mlruns wherever it runs); on a
    server the server's artifact destination applies.
    """
    local_default = not os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri(data_dir)
    # MLflow 3 also exports the URI to MLFLOW_TRACKING_URI here (for subprocesses).
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    existing = client.get_experiment_by_name(experiment)
    if existing is not None:
        experiment_id = existing.experiment_id
    else:
        artifact_location = None
        if local_default:
            artifacts = _mlflow_dir(data_dir) / "artifacts"
            artifacts.mkdir(parents=True, exist_ok=True)
            artifact_location = artifacts.as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _metric_tag(value) -> str:
    """A metric as a tag value: the number, or 'unavailable: <reason>' for a MetricValue without one."""
    if isinstance(value, Mapping):
        if "value" not in value:
            return f"unavailable: {value.get('unavailable', 'no value')}"
        value = value["value"]
    return repr(float(value))


def version_metrics(name: str, version: str | int, client: MlflowClient | None = None) -> dict[str, float]:
    """The numeric metric tags of a model version (unavailable ones left out)."""
    client = client or MlflowClient()
    tags = client.get_model_version(name, str(version)).tags
    numbers = {}
    for key, text in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                numbers[key[len(METRIC_TAG_PREFIX) :]] = float(text)
            except ValueError:
                continue  # "unavailable: ..."
    return numbers


def register_model_version(
    run_id: str, artifact_path: str, metrics: Mapping, name: str = MODEL_NAME, tags: Mapping[str, str] | None = None
) -> str:
    """Register the checkpoint folder logged at runs:/<run_id>/<artifact_path>; return the version.

    `metrics` maps names to floats or MetricValues; each becomes a version tag metric.<name>.
    """
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # mlflow.register_model("runs:/...") in MLflow 3 only accepts logged MLflow models; the
    # checkpoint is a plain artifact folder, so the version's source is its artifact URI.
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path.strip('/')}"
    version = client.create_model_version(
        name,
        source,
        run_id=run_id,
        tags={**{METRIC_TAG_PREFIX + key: _metric_tag(value) for key, value in metrics.items()}, **(tags or {})},
    )
    return str(version.version)


def set_alias(name: str, alias: str, version: str | int) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version number that `alias` names, None when the model or the alias does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _parse_alias_uri(uri: str) -> tuple[str, str] | None:
    """models:/<name>@<alias> -> (name, alias); other URIs -> None."""
    if uri.startswith("models:/") and "@" in uri:
        name, alias = uri[len("models:/") :].rstrip("/").split("@", 1)
        return name, alias
    return None


@dataclass(frozen=True)
class ModelSource:
    """Where a model URI points in MLflow: the run that produced it (None for a plain folder or a
    `base:` model), the artifact path in that run, and its registry version when the URI names one."""

    uri: str
    run_id: str | None
    artifact_path: str | None
    version: str | None


def model_source(uri: str) -> ModelSource:
    """Resolve runs:/<id>/<path>, models:/<name>@<alias> and models:/<name>/<version>; anything
    else has no run (a local folder is logged to the evaluation run when registered)."""
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/") :].partition("/")
        return ModelSource(uri, run_id, path.strip("/") or "model", None)
    if not uri.startswith("models:/"):
        return ModelSource(uri, None, None, None)
    client = MlflowClient()
    alias = _parse_alias_uri(uri)
    if alias is None:
        version = client.get_model_version(*uri[len("models:/") :].rstrip("/").rsplit("/", 1))
        return ModelSource(uri, version.run_id, None, str(version.version))
    number = alias_version(client, *alias)
    if number is None:
        raise ModelNotFoundError(
            f"no version of {alias[0]} has alias {alias[1]} yet: run the train and evaluate "
            "flows (or retrain) first, or pass a runs:/ URI or a local model folder"
        )
    return ModelSource(uri, client.get_model_version(alias[0], number).run_id, None, number)


def resolve_model_uri(uri: str = DEFAULT_MODEL_URI, dst_path: str | Path | None = None) -> Path:
    """A local folder holding the checkpoint named by `uri`.

    Accepts a local folder (returned as is), models:/<name>@<alias>, models:/<name>/<version>,
    runs:/<run_id>/<path> or any artifact URI MLflow can download (into `dst_path` or a temp dir).
    """
    if not urlparse(uri).scheme:
        local = Path(uri).expanduser()
        if not local.is_dir():
            raise ModelNotFoundError(f"{uri} is neither a model URI nor an existing checkpoint folder")
        return local
    alias = _parse_alias_uri(uri)
    if alias is not None:
        name, alias_name = alias
        if alias_version(MlflowClient(), name, alias_name) is None:
            raise ModelNotFoundError(
                f"no version of {name} has alias {alias_name} yet: run the retrain or "
                "train+evaluate flows, or pass a local checkpoint"
            )
    if dst_path is not None:
        Path(dst_path).mkdir(parents=True, exist_ok=True)
    try:
        folder = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=None if dst_path is None else str(dst_path)
        )
    except MlflowException as error:
        raise ModelNotFoundError(f"could not download {uri}: {error.message}") from error
    return Path(folder)
