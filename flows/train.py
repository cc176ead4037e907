"""train: precompute (cached per clip) -> stage 1 -> stage 2, tracked in MLflow.

    python -m flows.train --config configs/tiny.yaml --set train.stage1.max_steps=3
    python -m flows.train --config configs/poc-1.3b.yaml --init-from models:/product-video-generator@champion

Started again with the same config on the same data, it resumes the run's last checkpoint into
the same MLflow run (`--no-resume` starts a new one). MLflow: MLFLOW_TRACKING_URI when set, else
SQLite under `mlflow.data_dir` (`mlflow ui --backend-store-uri sqlite:///data/mlflow/mlflow.db`).

With train.distributed.nproc_per_node > 1 (or strategy fsdp) it trains through torchrun on that
many GPUs of this host (tasks/training/torchrun.py, docs/distributed.md):

    python -m flows.train --config configs/poc-1.3b.yaml --set train.distributed.nproc_per_node=2
"""

from __future__ import annotations

import argparse

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from storage.config_files import ConfigError
from storage.results import add_result_argument, emit_result
from tasks.training.precompute import precompute_latents
from tasks.training.run_config import RunConfig, load_run_config, resolve_run_config
from tasks.training.torchrun import train_with_torchrun
from tasks.training.train import run_training


@flow(name="precompute", log_prints=True)
def precompute(
    config: str = "configs/tiny.yaml",
    overrides: list[str] = [],  # noqa: B006 - a flow parameter (deployments show this default), never mutated
) -> dict:
    """Only the precompute step of `train` (cached per clip): {signature, ran, cached, rows, rejects}."""
    return precompute_latents(load_run_config(config, overrides))


@flow(name="train", log_prints=True)
def train(
    config: str | RunConfig = "configs/tiny.yaml",
    overrides: list[str] = [],  # noqa: B006 - a flow parameter (deployments show this default), never mutated
    resume: bool = True,
    init_from: str | None = None,
) -> dict:
    """Train the run config's model (a YAML path, or a RunConfig a caller has read: retrain);
    returns {run_id, model_uri (runs:/<id>/model), run_dir, model_dir, stage, global_step,
    final_loss, resumed_from_step, precompute: {...}}."""
    logger = get_run_logger()
    cfg = resolve_run_config(config, overrides)
    latents = precompute_latents(cfg)
    launch = train_with_torchrun if cfg.train.distributed.uses_torchrun else run_training
    result = launch(cfg, resume=resume, init_from=init_from)
    result = result | {
        "precompute": {key: latents[key] for key in ("signature", "ran", "cached")}
        | {"rejects": len(latents["rejects"])}
    }
    resumed = (
        f"resumed from step {result['resumed_from_step']}"
        if result["resumed_from_step"] is not None
        else "from the start"
    )
    logger.info("trained %s (%s) to step %d: %s", cfg.name, resumed, result["global_step"], result["model_uri"])
    create_markdown_artifact(
        f"# Training run `{result['run_id']}`\n\nConfig `{config if isinstance(config, str) else cfg.name}` "
        f"{overrides or ''}, {resumed}, "
        f"{result['global_step']} steps, final loss {result['final_loss']:.4g}.\n\n"
        f"- model: `{result['model_uri']}` (local copy `{result['model_dir']}`)\n"
        f"- precompute: {result['precompute']['ran']} clips encoded, {result['precompute']['cached']} from cache, "
        f"{result['precompute']['rejects']} set aside\n",
        key="train-run",
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Precompute latents and train the product video generator.")
    parser.add_argument("--config", default="configs/tiny.yaml", help="run config YAML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. train.stage1.max_steps=3 (repeatable)",
    )
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start a new run")
    parser.add_argument("--init-from", default=None, help="model folder or runs:/ / models:/ URI to fine-tune")
    add_result_argument(parser)
    args = parser.parse_args(argv)
    try:  # checked before the flow starts: a bad key is one line, exit 2
        load_run_config(args.config, args.overrides)
    except (FileNotFoundError, ConfigError) as error:
        parser.exit(2, f"error: {error}\n")
    result = train(config=args.config, overrides=args.overrides, resume=args.resume, init_from=args.init_from)
    return emit_result(result, args.result)


if __name__ == "__main__":
    main()
