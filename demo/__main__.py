"""`make demo`: synthetic product pages -> build-dataset -> train -> evaluate -> register -> generate.

Local Prefect (a temporary server, no setup), weights-free backends, the `tiny` model config on
CPU (a few optimizer steps of each stage: the video it generates is noise, the pipeline is real).
The dataset and generated video go under --data; MLflow (runs, registry) and training runs go
where configs/tiny.yaml says (data/mlflow, data/runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demo.studio import StudioConfig, generate_studio
from flows.build_dataset import build_dataset
from flows.evaluate import evaluate
from flows.generate import run_generate
from flows.train import train
from storage.images import save_png
from storage.layout import DatasetRoot
from storage.tracking import DEFAULT_MODEL_URI, tracking_uri
from storage.video import write_video
from tasks.training.evaluate import load_clip, split_rows
from tasks.training.run_config import RunConfig, load_run_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
DATASET_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dataset" / "demo.yaml"  # weights-free backends


def write_generate_inputs(cfg: RunConfig, folder: Path) -> dict:
    """A test clip at the model's size as a user would bring it: masked video, mask PNGs, photos."""
    row = split_rows(cfg.data.root, "test")[0]
    clip = load_clip(cfg.data.root, row, cfg.data)
    out = DatasetRoot.create(folder)
    with out.atomic_file("masked.mp4") as tmp:
        write_video(tmp, (clip.video * ~clip.masks[..., None] * 255).round().astype("uint8"), fps=row["fps"])
    with out.atomic_dir("masks") as tmp:
        for index, mask in enumerate(clip.masks):
            save_png(tmp / f"{index:05d}.png", mask.astype("uint8") * 255)
    with out.atomic_dir("images") as tmp:
        for index, photo in enumerate(clip.photos):
            save_png(tmp / f"{index}.png", photo)
    return {
        "masked_video": str(out.path("masked.mp4")),
        "masks": str(out.path("masks")),
        "images": [str(p) for p in sorted(out.path("images").glob("*.png"))],
        "caption": row["caption"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the ProductVideoGenerator demo end to end on synthetic data.")
    parser.add_argument("--data", default="data/demo", help="folder for everything the demo writes")
    parser.add_argument("--products", type=int, default=12, help="synthetic products to generate")
    args = parser.parse_args(argv)
    data = Path(args.data).resolve()
    source, truth, dataset = data / "source", data / "truth", data / "dataset"

    if not (source / "products.csv").exists():
        print(f"writing {args.products} synthetic products to {source} (ground truth in {truth})")
        generate_studio(source, truth, StudioConfig(num_products=args.products))
    summary = build_dataset(source=str(source), output=str(dataset), config=str(DATASET_CONFIG))

    # One resolved config for the whole demo, so train and evaluate read the same dataset.
    cfg = load_run_config(CONFIG, [f"data.root={dataset}"])
    config = data / "tiny.yaml"
    config.write_text(cfg.to_yaml())
    trained = train(config=str(config))
    evaluation = evaluate(model=trained["model_uri"], config=str(config))
    inputs = write_generate_inputs(cfg, data / "generate_input")
    output = run_generate(
        inputs["masks"],
        inputs["images"],
        str(data / "generated" / "demo.mp4"),
        masked_video=inputs["masked_video"],
        caption=inputs["caption"],
        model=DEFAULT_MODEL_URI,
        overwrite=True,
        data_dir=cfg.mlflow.data_dir,
    )

    registry = evaluation["registry"]
    print(
        f"\nDataset: {dataset}\n"
        f"  dataset.json, manifests/*.parquet (rejects: manifests/rejects.parquet), build.yaml (its config)\n"
        f"  clips per split: {summary['clips_per_split']}\n"
        f"Training run {trained['run_id']}: {trained['global_step']} steps, model {trained['model_uri']}\n"
        f"  checkpoints: {trained['run_dir']}\n"
        f"Evaluation run {evaluation['evaluation_run_id']}: verdict {evaluation['verdict']}; "
        f"per-clip metrics and videos in {evaluation['folder']}\n"
        f"Registry: {cfg.registry.model_name} version {registry.get('version')} "
        f"({'champion' if registry.get('promoted') else 'challenger'})\n"
        f"Generated video: {output.resolve()}\n"
        f"  again: python -m flows.generate --masked-video {inputs['masked_video']} --masks {inputs['masks']} "
        f"--images {' '.join(inputs['images'])} --output out.mp4\n"
        f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri(cfg.mlflow.data_dir)}\n"
        f"Prefect runs and artifacts: run `prefect server start` (PREFECT_HOME={Path('data/prefect').resolve()}) "
        "and open http://127.0.0.1:4200"
    )


if __name__ == "__main__":
    main()
