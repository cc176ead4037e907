"""Gate 3 of issue 14: before any long run, the model must be able to learn a few clips by heart.

A dataset root holding the first N train clips of the PoC dataset (files copied, manifests
filtered: a dataset root's paths must stay inside it) is trained on through the train flow with
the PoC config, then those same clips are generated on the exact sampler and measured inside
the mask. Far below 20 dB, something is broken (data, conditioning, objective, sampler) and no
long run can help.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments.poc import CONFIG
from experiments.poc.measure import generate
from models import metrics as m
from models.device import resolve_device
from storage.layout import DatasetRoot
from tasks.training.evaluate import load_clip
from tasks.training.model_store import load_pipeline
from tasks.training.run_config import load_run_config

MANIFESTS_BY_CLIP = ("clips", "masks", "masked_videos")


def subset_dataset(source: Path, target: Path, clips: int) -> list[dict]:
    """The first `clips` train clips of `source` as a dataset root at `target` (made once); returns their rows."""
    src = DatasetRoot(source.resolve())
    rows = sorted(
        (r for r in src.read_manifest("dataset").to_pylist() if r["split"] == "train"), key=lambda r: r["clip_key"]
    )[:clips]
    if target.joinpath("manifests", "dataset.parquet").is_file():
        return rows
    dst = DatasetRoot.create(target)
    keys, products = {r["clip_key"] for r in rows}, {r["product_id"] for r in rows}
    for row in rows:
        for rel in (row["video_path"], row["masked_video_path"], *row["product_images"]):
            dst.path(rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src.path(rel), dst.path(rel))
        shutil.copytree(src.path(row["mask_dir"]), dst.path(row["mask_dir"]), dirs_exist_ok=True)
    for name in MANIFESTS_BY_CLIP:
        dst.write_manifest(name, [r for r in src.read_manifest(name).to_pylist() if r["clip_key"] in keys])
    for name in ("products", "product_images"):
        dst.write_manifest(name, [r for r in src.read_manifest(name).to_pylist() if r["product_id"] in products])
    dst.write_manifest("dataset", rows)
    return rows


def run_overfit(
    dataset: Path, folder: Path, clips: int, steps: int, overrides: list[str], config: str = CONFIG
) -> dict:
    """Train on `clips` train clips for `steps` steps (every window in each batch), then measure them."""
    rows = subset_dataset(dataset, folder / "dataset", clips)
    cfg = load_run_config(config, [f"data.root={folder / 'dataset'}"])
    batch = clips * cfg.data.windows_per_clip
    result_file = folder / "train.json"
    command = [sys.executable, "-m", "flows.train", "--config", config, "--result", str(result_file)]
    for item in [
        *overrides,
        f"data.root={folder / 'dataset'}",
        "train.run_name=poc-overfit",
        f"train.stage1.max_steps={steps}",
        f"train.stage1.batch_size={batch}",
        "train.sample_every_epoch=0",
        "train.warmup_steps=20",
        "train.ema_decay=null",
        "model.objective.drop_product_prob=0",
        "model.objective.drop_both_prob=0",
        "model.objective.drop_text_prob=0",
    ]:
        command += ["--set", item]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    trained = json.loads(result_file.read_text())
    device = resolve_device("auto").type
    pipe, _ = load_pipeline(trained["model_dir"], device=device, plain=True)
    inputs = [load_clip(folder / "dataset", row, cfg.data) for row in rows]
    generated = generate(pipe, inputs, [c.photos for c in inputs], cfg, device)
    per_clip = {c.row["clip_key"]: m.psnr(g, c.video, c.masks) for g, c in zip(generated, inputs)}
    return {
        "clips": clips,
        "steps": steps,
        "batch_size": batch,
        "train_seconds": seconds,
        "final_loss": trained["final_loss"],
        "model_uri": trained["model_uri"],
        "psnr_mask_db": sum(per_clip.values()) / len(per_clip),
        "per_clip": per_clip,
    }
