"""evaluate: a trained model -> metrics per split and category, the PoC report, a registry version.

```
model (models:/...@champion | runs:/<id>/model | folder) ─ load pipeline ─┬─ evaluate test split (every clip)
                                                                         └─ evaluate train split (a few clips)
   ─ MLflow run "evaluate-..." (metrics, per-clip rows, videos) ─ PoC report (+ training loss curve)
   ─ register version of `product-video-generator` ─ challenger alias ─ champion if better
```

Evaluation compares models on exact output: every step computed, whatever the model's speed
settings. With `calibrate` (`--calibrate`, or `evaluate.calibration.enabled`) it then measures
step caches on the model (tasks/training/calibration.py) and records the one it may use, or
none, on the evaluation run and on the model's registry version (tags `step_cache*`), where
`python -m flows.generate --fast` reads it.

Settings come from the model's own run config (what it was trained with); `config` replaces its
`data`, `evaluate`, `registry` and `mlflow` sections (the model section always stays the
model's), `dataset` its dataset root. The report's train criteria need train-split metrics, so
a few train clips are generated too (`train_clips`).

Registering: a model from a training run (`runs:/<id>/model`, what the train flow returns)
becomes a new version whose source is that run's artifact; a local model folder is first logged
to the evaluation run; a model that already is a registry version is not registered again. Each
version carries the test metrics as tags `metric.<name>`, the evaluation run id, and the
training data it was trained on (clip keys + content hashes, see tasks.training.registry)
so `retrain` can tell whether the dataset has new data since. Which version becomes champion is
tasks.training.registry.promote_if_better's rule.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from models import metrics as m
from models.device import resolve_device
from storage import tracking
from storage.config_files import ConfigError
from storage.results import add_result_argument, emit_result
from tasks.training.calibration import (
    RECORD_ARTIFACT,
    STEP_CACHE_TAG,
    calibrate_step_cache_task,
    registry_tags,
    registry_version,
)
from tasks.training.evaluate import EvaluationError, evaluate_split_task, split_rows
from tasks.training.model_store import (
    IncompatibleCheckpointError,
    is_base_model,
    load_pipeline,
    read_model_card,
    read_run_config,
    resolve_model,
)
from tasks.training.registry import TRAINING_DATA_RUN_TAG, TRAINING_DATA_TAG, promote_if_better, record_training_data
from tasks.training.report import publish_poc_report
from tasks.training.run_config import MlflowConfig, RunConfig, resolve_run_config

LOSS_METRIC = "loss"  # what the train flow (tasks/training/train.py) logs per optimizer step


def effective_config(model_config: RunConfig, config: RunConfig | None, dataset: str | None) -> RunConfig:
    """The model's run config with data/evaluate/registry/mlflow from `config` (the evaluate
    flow's config, overrides applied) and the dataset root."""
    merged = model_config
    if config is not None:
        merged = merged.model_copy(
            update={name: getattr(config, name) for name in ("data", "evaluate", "registry", "mlflow")}
        )
    if dataset:
        merged = merged.model_copy(update={"data": merged.data.model_copy(update={"root": dataset})})
    return merged


def loss_history(run_id: str | None) -> list[tuple[int, float]]:
    """The training run's per-step loss as (step, loss) pairs (empty without a run)."""
    if run_id is None:
        return []
    history = MlflowClient().get_metric_history(run_id, LOSS_METRIC)
    return [(point.step, point.value) for point in sorted(history, key=lambda p: (p.step, p.timestamp))]


def _numbers(prefix: str, metrics: dict) -> dict[str, float]:
    return {
        f"{prefix}/{name}": value["value"]
        for name, value in metrics.items()
        if isinstance(value, dict) and "value" in value
    }


def metrics_table(results: dict[str, dict], split: str) -> list[dict]:
    """One row per metric: its value (or why unavailable) per split and per category of `split`."""
    columns = {name: result["overall"] for name, result in results.items()}
    columns |= {f"{split}: {category}": row for category, row in results[split]["by_category"].items()}
    names = sorted({name for column in columns.values() for name in column})
    table = []
    for name in names:
        row = {"metric": name}
        for column, values in columns.items():
            value = values.get(name)
            row[column] = (
                "—"
                if value is None
                else f"{value['value']:.4g}"
                if "value" in value
                else f"unavailable: {value['unavailable']}"
            )
        table.append(row)
    return table


def _record_training_data(run_id: str, model_config: RunConfig, card: dict) -> str:
    """Log {clip_key: content hash} of the data the model was trained on; return its fingerprint.

    The dataset is the one the model card (else the model's run config) names, read now: the
    evaluate flow runs right after training in train -> evaluate and retrain.
    """
    return record_training_data(run_id, card.get("dataset_root") or model_config.data.root)


def register_evaluated(
    source: tracking.ModelSource,
    model_dir: Path,
    eval_run_id: str,
    test_metrics: dict,
    run_config: RunConfig,
    fingerprint: str,
    log,
    extra_tags: dict[str, str] | None = None,
) -> dict:
    """A registry version for the evaluated model (see the module doc) and the promotion decision.
    extra_tags (a calibration's) go on the new version."""
    name = run_config.registry.model_name
    if source.version is not None:
        log(f"{source.uri} already is version {source.version} of {name}: not registered again")
        return {
            "version": source.version,
            "registered": False,
            "promoted": False,
            "reason": "already a registry version",
        }
    if source.run_id is None:  # a local folder: the evaluation run keeps a copy to point at
        MlflowClient().log_artifacts(eval_run_id, str(model_dir), "model")
        run_id, path = eval_run_id, "model"
    else:
        run_id, path = source.run_id, source.artifact_path
    version = tracking.register_model_version(
        run_id,
        path,
        test_metrics,
        name=name,
        tags={
            "evaluation_run_id": eval_run_id,
            TRAINING_DATA_TAG: fingerprint,
            TRAINING_DATA_RUN_TAG: eval_run_id,
            "dataset_root": str(run_config.data.root),
            **(extra_tags or {}),
        },
    )
    if run_config.registry.promote:
        decision = promote_if_better(
            name, version, run_config.evaluate.primary_metric, run_config.evaluate.higher_is_better
        )
    else:
        tracking.set_alias(name, tracking.CHALLENGER, version)
        decision = {"promoted": False, "reason": "registry.promote is false"}
    log(
        f"registered {name} version {version}; champion: "
        f"{'moved to it' if decision['promoted'] else 'unchanged'} ({decision['reason']})"
    )
    return {"registered": True, **decision, "version": version}


@flow(name="evaluate", log_prints=True)
def evaluate(
    model: str = tracking.DEFAULT_MODEL_URI,
    config: str | RunConfig | None = None,
    dataset: str | None = None,
    split: str = "test",
    register: bool = True,
    train_clips: int = 4,
    device: str = "auto",
    overrides: list[str] = [],  # noqa: B006 - a flow parameter (deployments show this default), never mutated
    baseline: str | None = None,
    calibrate: bool | None = None,
) -> dict:
    """Evaluate `model` on `split` (+ a few train clips), report, register, promote if better.

    model: a models:/ or runs:/ URI, a model folder, or `base:<run config>` (the untrained model
    of a config, e.g. zero-shot VACE: never registered). config: a run config YAML, or a RunConfig
    a caller has read (retrain). overrides: dotted key=value settings of `config` (its
    data/evaluate/registry/mlflow sections). baseline: another model evaluated on the same split
    with the same settings (not registered), reported side by side. calibrate: measure step
    caches on the model and record the one it may use (None: evaluate.calibration.enabled)."""
    config = resolve_run_config(config, overrides) if config is not None else None  # read once
    bootstrap = config.mlflow if config is not None else MlflowConfig()
    experiment_id = tracking.setup_mlflow(bootstrap.experiment, bootstrap.data_dir)
    logger = get_run_logger()
    if register and is_base_model(model):
        logger.info("%s is an untrained base model: evaluated, not registered", model)
        register = False
    summary = _evaluate_uri(model, experiment_id, config, dataset, split, register, train_clips, device, calibrate)
    if baseline is not None:
        other = _evaluate_uri(baseline, experiment_id, config, dataset, split, False, 0, device, False)
        create_table_artifact(
            comparison_table(summary, other, split),
            key="evaluation-comparison",
            description=f"{model} and the baseline {baseline} on the {split} split",
        )
        summary["baseline"] = other
    return summary


def _evaluate_uri(
    model: str,
    experiment_id: str,
    config: RunConfig | None,
    dataset: str | None,
    split: str,
    register: bool,
    train_clips: int,
    device: str,
    calibrate: bool | None = None,
) -> dict:
    source = tracking.model_source(model)  # a missing alias fails here with what to do
    with tempfile.TemporaryDirectory(prefix="evaluate-model-") as scratch:  # a downloaded model is dropped after
        model_dir = resolve_model(model, scratch)
        return _evaluate_model(
            source, model_dir, experiment_id, config, dataset, split, register, train_clips, device, calibrate
        )


def comparison_table(summary: dict, baseline: dict, split: str) -> list[dict]:
    """One row per metric of `split`: the model's value, the baseline's, and their difference."""
    ours, theirs = summary["metrics"][split], baseline["metrics"][split]
    rows = []
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        rows.append(
            {
                "metric": name,
                summary["model"]: "unavailable" if a is None else f"{a:.4g}",
                baseline["model"]: "unavailable" if b is None else f"{b:.4g}",
                "difference": "—" if a is None or b is None else f"{a - b:+.4g}",
            }
        )
    return rows


def _evaluate_model(
    source: tracking.ModelSource,
    model_dir: Path,
    experiment_id: str,
    config: RunConfig | None,
    dataset: str | None,
    split: str,
    register: bool,
    train_clips: int,
    device: str,
    calibrate: bool | None = None,
) -> dict:
    """The evaluate flow's body, on a local model folder."""
    logger, model = get_run_logger(), source.uri
    model_config = read_run_config(model_dir)
    run_config = effective_config(model_config, config, dataset)
    root = str(Path(run_config.data.root).expanduser().resolve())
    split_rows(root, split)  # an empty split fails here, before a model is loaded or a run logged
    pipe, _ = load_pipeline(model_dir, device=resolve_device(device))  # exact: every step computed

    settings = run_config.evaluate
    calibrate = settings.calibration.enabled if calibrate is None else calibrate
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"evaluate-{split}",
        tags={"model_uri": model, "source_run_id": source.run_id or "", "model_version": source.version or ""},
    ) as run:
        run_id = run.info.run_id
        mlflow.log_params(
            {
                "model": model,
                "split": split,
                "dataset": root,
                "train_clips": train_clips,
                "num_inference_steps": settings.num_inference_steps,
                "seed": settings.seed,
                "text_guidance_scale": settings.text_guidance_scale,
                "product_guidance_scale": settings.product_guidance_scale,
                "primary_metric": settings.primary_metric,
            }
        )
        folder = Path(run_config.mlflow.data_dir).resolve() / "evaluations" / run_id
        results = {
            split: evaluate_split_task(pipe, run_config, root, split, folder, settings.max_clips, log=logger.info)
        }
        if split != "train" and train_clips > 0:
            results["train"] = evaluate_split_task(
                pipe, run_config, root, "train", folder, train_clips, log=logger.info
            )
        for name, result in results.items():
            mlflow.log_metrics(_numbers(name, result["overall"]))
            for category, values in result["by_category"].items():
                mlflow.log_metrics(_numbers(f"{name}/category/{category}", values))
        mlflow.log_artifacts(str(folder), "evaluation")
        calibration = (
            _calibrate(pipe, run_config, root, split, run_id, logger.info, register or source.version is not None)
            if calibrate
            else None
        )

        test = results[split]
        verdict = publish_poc_report(
            results.get("train", test)["overall"],
            test["overall"],
            test["by_category"],
            {"train": loss_history(source.run_id)},
            run_id,
            settings.thresholds,
        )
        create_table_artifact(
            metrics_table(results, split),
            key="evaluation-metrics",
            description=f"Metrics of {model} ({split} split per category; unavailable = why)",
        )
        fingerprint = _record_training_data(run_id, model_config, read_model_card(model_dir))
        calibration_tags = None if calibration is None else registry_tags(calibration, run_id)
        registry = (
            register_evaluated(
                source, model_dir, run_id, test["overall"], run_config, fingerprint, logger.info, calibration_tags
            )
            if register
            else {"registered": False, "reason": "register is false"}
        )
        if calibration_tags and source.version is not None:  # a registry version already: tag it
            registered_name, version = registry_version(source.uri)
            for key, value in calibration_tags.items():
                MlflowClient().set_model_version_tag(registered_name, version, key, value)
            logger.info("step-cache calibration recorded on version %s of %s", version, registered_name)

    summary = {
        "evaluation_run_id": run_id,
        "model": model,
        "split": split,
        "folder": str(folder),
        "verdict": verdict["outcome"],
        "registry": registry,
        "metrics": {name: {k: m.value_of(v) for k, v in r["overall"].items()} for name, r in results.items()},
        "calibration": calibration,
    }
    logger.info("evaluation run %s: %s", run_id, json.dumps(summary["metrics"][split]))
    return summary


def _calibrate(pipe, run_config: RunConfig, root: str, split: str, run_id: str, log, recorded: bool) -> dict:
    """Step-cache calibration of the evaluated model, logged to the evaluation run (the record as
    an artifact, the readable tags, a metric per row); the registry tags follow in register_evaluated."""
    record = calibrate_step_cache_task(pipe, run_config, root, split, log=log)
    mlflow.log_dict(record, RECORD_ARTIFACT)
    mlflow.set_tags({key: value for key, value in registry_tags(record, run_id).items() if key != STEP_CACHE_TAG})
    for row in record["rows"]:
        prefix = f"calibration/{row['method']}/{row['threshold']:g}".replace("+", "")  # 1e+09: no + in a name
        mlflow.log_metrics(
            {f"{prefix}/{key}": row[key] for key in ("psnr_mask_change_db", "speedup", "full_step_fraction")}
        )
    if not recorded:
        log("the calibration is on the evaluation run only: the model is not a registry version (--fast needs one)")
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Evaluate a model, write the PoC report, register it.")
    parser.add_argument(
        "--model",
        default=tracking.DEFAULT_MODEL_URI,
        help="models:/, runs:/ URI, model folder or base:<run config> (the untrained model)",
    )
    parser.add_argument("--config", default=None, help="run config whose data/evaluate/registry/mlflow sections apply")
    parser.add_argument("--dataset", default=None, help="dataset root (default: the config's data.root)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--train-clips", type=int, default=4, help="train clips generated for the train criteria")
    parser.add_argument("--no-register", dest="register", action="store_false", help="do not register the model")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of --config, e.g. evaluate.num_inference_steps=20",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="another model reported side by side, e.g. base:configs/vace-1.3b.yaml (zero-shot VACE)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        default=None,
        help="also measure step caches on the model and record the one `generate --fast` may use "
        "(evaluate.calibration in the config: clips, thresholds, the 0.3 dB budget)",
    )
    add_result_argument(parser)
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error("--set overrides a setting of --config: pass --config too")
    try:  # checked before the flow starts: a bad key is one line, exit 2
        if args.config:
            resolve_run_config(args.config, args.overrides)
    except (FileNotFoundError, ConfigError) as error:
        parser.exit(2, f"error: {error}\n")
    try:
        summary = evaluate(
            model=args.model,
            config=args.config,
            dataset=args.dataset,
            split=args.split,
            register=args.register,
            train_clips=args.train_clips,
            device=args.device,
            overrides=args.overrides,
            baseline=args.baseline,
            calibrate=args.calibrate,
        )
    except (tracking.ModelNotFoundError, IncompatibleCheckpointError, EvaluationError) as error:
        parser.exit(2, f"error: {error}\n")
    return emit_result(summary, args.result)


if __name__ == "__main__":
    main()
