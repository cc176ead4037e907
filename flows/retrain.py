"""retrain: refresh the dataset, and when it has new data fine-tune the champion, evaluate,
register, promote if better.

```
build-dataset (incremental, cached) ─ new data since the champion? ─ no ─> nothing (says so)
                                                                   └ yes ─> train (init from champion)
                                                                            ─ evaluate ─ register ─ promote if better
```

Scheduled weekly and triggered by completed build-dataset deployment runs (prefect.yaml).

"New data" is decided on content, not dates: the training split's clips as {clip_key: content
hash} (clip, masks, product photos and caption; tasks.training.evaluate.training_data_hashes) compared
with the same map recorded for the champion when it was evaluated and registered (artifact
`training_data.json` of its evaluation run, named by the version tag `training_data.run_id`;
tasks.training.registry writes and reads that record). A clip added or re-built with other content
is new data; clips that only disappeared are not a reason to retrain. A champion without that
record (registered by hand) is retrained, since nothing proves its data is current.

The refresh builds the dataset the way it was built: with the build config the dataset root
records (its build.yaml, written by build-dataset; tasks/dataset/build_config.py), so nothing but
new source data changes it. The run config is read once; the dataset root, resolved once, reaches
build-dataset, train and evaluate as that config's `data.root`.

build-dataset, train and evaluate run as subflows of retrain (child flow runs in the Prefect UI,
in this process), but flows import no flows (tests/test_layers.py): retrain loads each one by its
entrypoint (`SUBFLOWS`, the same flows prefect.yaml deploys) when it runs, so their parameters are
its only contract with them; what it shares with evaluate lives in tasks/training/registry.py. The
alternative, `run_deployment`, would need the deployments and a worker for every run of retrain.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from prefect import Flow, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.flows import load_flow_from_entrypoint

from storage import tracking
from storage.config_files import ConfigError
from storage.layout import DatasetRoot
from tasks.dataset.build_config import BuildConfig, recorded_build_config
from tasks.training.registry import data_changes
from tasks.training.run_config import load_run_config

# The flows retrain runs, by entrypoint (module:function; prefect.yaml names the same files).
SUBFLOWS = {
    "build_dataset": "flows.build_dataset:build_dataset",
    "train": "flows.train:train",
    "evaluate": "flows.evaluate:evaluate",
}


def subflow(step: str) -> Flow:
    """The flow that retrain runs as `step` (a key of SUBFLOWS), loaded from its entrypoint."""
    return load_flow_from_entrypoint(SUBFLOWS[step], use_placeholder_flow=False)


def champion_version(name: str):
    """The registry version with alias champion; a clear error when there is none."""
    try:
        return MlflowClient().get_model_version_by_alias(name, tracking.CHAMPION)
    except mlflow.exceptions.MlflowException as error:
        raise tracking.ModelNotFoundError(
            f"{name} has no champion to fine-tune: train and evaluate a first model (flows train + "
            "evaluate, or `python -m demo`), then retrain"
        ) from error


def recorded_build(root: str) -> BuildConfig:
    """How the dataset at `root` was built (its build.yaml); a clear error when it does not say."""
    recorded = recorded_build_config(DatasetRoot(Path(root)))
    if recorded is None:
        raise ConfigError(
            f"dataset {root} records no build config (build.yaml), so retrain cannot refresh it the way it "
            "was built: build it once with build-dataset and the config it was built with "
            f"(python -m flows.build_dataset --source SOURCE --output {root} --config configs/dataset/<name>.yaml), "
            "which records it, or retrain with refresh_dataset=False"
        )
    return recorded


def _describe(changes: dict, version: str) -> str:
    if not changes["known"]:
        return f"champion version {version} has no record of its training data"
    return (
        f"{len(changes['new'])} new and {len(changes['changed'])} changed train clips since champion "
        f"version {version} ({len(changes['removed'])} removed)"
    )


@flow(name="retrain", log_prints=True)
def retrain(
    source: str = "data/demo/source",
    dataset: str | None = None,
    config: str = "configs/tiny.yaml",
    refresh_dataset: bool = True,
) -> dict:
    """Refresh `dataset` (default: the config's data.root) from `source` with the build config it
    records (build.yaml); retrain if it has new data."""
    logger = get_run_logger()
    build_dataset, train, evaluate = (subflow(step) for step in ("build_dataset", "train", "evaluate"))
    cfg = load_run_config(config)  # the one read of the run config; train and evaluate get this object
    root = str(Path(dataset or cfg.data.root).expanduser().resolve())
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": root})})
    build = recorded_build(root) if refresh_dataset else None  # before any work, as the champion
    tracking.setup_mlflow(cfg.mlflow.experiment, cfg.mlflow.data_dir)
    champion = champion_version(cfg.registry.model_name)  # before any work: no champion, no retrain
    built = build_dataset(source=source, output=root, config=build) if refresh_dataset else None

    changes = data_changes(champion, root)
    described = _describe(changes, champion.version)
    if changes["known"] and not changes["new"] and not changes["changed"]:
        message = f"No new data: {described}. Nothing to do; the champion stays version {champion.version}."
        logger.info(message)
        create_markdown_artifact(f"# Retrain: nothing to do\n\n{message}\n", key="retrain-decision")
        return {"retrained": False, "reason": message, "champion": str(champion.version), "dataset": built}

    logger.info("retraining: %s", described)
    champion_uri = f"models:/{cfg.registry.model_name}/{champion.version}"  # pinned: the alias may move
    trained = train(config=cfg, init_from=champion_uri)
    evaluation = evaluate(model=trained["model_uri"], config=cfg, register=True)
    registry = evaluation["registry"]
    outcome = (
        f"version {registry['version']} is the new champion"
        if registry.get("promoted")
        else f"champion stays version {champion.version}: {registry.get('reason')}"
    )
    create_markdown_artifact(
        f"# Retrain: {outcome}\n\n- data: {described}\n- fine-tuned from `{champion_uri}`: training run "
        f"`{trained['run_id']}`, {trained['global_step']} steps\n- evaluation run "
        f"`{evaluation['evaluation_run_id']}`, verdict {evaluation['verdict']}\n",
        key="retrain-decision",
    )
    return {
        "retrained": True,
        "reason": described,
        "champion": str(champion.version),
        "dataset": built,
        "train": trained,
        "evaluation": evaluation,
    }
