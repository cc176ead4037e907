"""Evaluation: generate every clip of a split with a model, measure it against the real clip.

Each clip is generated from what a user would give the model: the clip with its product region
blanked (computed here as `clip * (1 - mask)`, not read from the H.264 masked video, which can
leak product colour), the masks and the product photos, with the prompt training used
(`data.prompt_from`: the caption or the category word). The clip
goes through the same frame window, crop and photo compositing as training samples (precompute's
functions, `data:` of the run config), so generated and real videos are compared pixel for pixel
at the model's resolution.

Per clip: every metric of `models.metrics.evaluate_clip` (networks that are not configured or
cannot load say "unavailable", never a number from random weights). Per split: the mean over
clips, overall and per category (`models.metrics.aggregate`, which also turns per-clip video
features into FVD). The per-clip rows and the generated videos are written to an output folder
(atomic writes, one folder per split).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models import metrics as m
from models.config import SamplerConfig
from models.pipeline import ProductVideoPipeline
from storage.hashing import sha256_json
from storage.layout import DatasetRoot
from storage.rejects import RejectError
from storage.video import write_video
from tasks.dataset.assemble import SPLITS
from tasks.training.precompute import clip_items, load_clip_window, load_product_photos
from tasks.training.run_config import DataConfig, EvaluateConfig, RunConfig, prompt_of

ROWS_FILE = "metrics_per_clip.jsonl"
SUMMARY_FILE = "metrics.json"
IDENTITY_COLUMNS = ("clip_key", "product_id", "category", "split")


class EvaluationError(ValueError):
    """The evaluation cannot run on this input (e.g. an empty split); the message says what to do."""


@dataclass(frozen=True)
class ClipInputs:
    """One clip at the model's resolution: video (T, H, W, 3) float in [0, 1], masks (T, H, W)
    bool (True = product), product photos as RGBA uint8 cut-outs, the prompt."""

    row: dict
    video: np.ndarray
    masks: np.ndarray
    photos: list[np.ndarray]
    prompt: str


def split_rows(dataset_root: str | Path, split: str, max_clips: int | None = None) -> list[dict]:
    """The dataset manifest's rows of `split` (sorted by clip key, the first `max_clips`).

    An unknown or empty split is an EvaluationError naming what the dataset has.
    """
    root = DatasetRoot(Path(dataset_root).expanduser().resolve())
    if not root.has_manifest("dataset"):
        raise EvaluationError(
            f"no dataset at {root.root} (manifests/dataset.parquet is missing): "
            "run build-dataset first, or pass the dataset root"
        )
    rows = root.read_manifest("dataset").to_pylist()
    if split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    selected = sorted((r for r in rows if r["split"] == split), key=lambda r: r["clip_key"])
    if not selected:
        counts = Counter(r["split"] for r in rows)
        have = ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS)
        raise EvaluationError(
            f"split {split!r} of the dataset at {root.root} has no clips (clips per split: {have}): "
            "add products and rebuild the dataset (build-dataset assigns whole products to splits), "
            "or evaluate another split"
        )
    return selected[:max_clips] if max_clips else selected


def load_clip(dataset_root: str | Path, row: dict, data: DataConfig) -> ClipInputs:
    """The clip, its masks and photos exactly as a training sample sees them (precompute's window,
    crop and photo compositing). A clip that does not fit the window is an EvaluationError."""
    root = DatasetRoot(Path(dataset_root).expanduser().resolve())
    try:
        video, mask = load_clip_window(
            root, row["video_path"], row["mask_dir"], data.frames, data.frame_stride, data.height, data.width
        )
    except RejectError as error:
        raise EvaluationError(f"clip {row['clip_key']}: {error}") from error
    photos = load_product_photos(root, row["product_images"], data.max_product_images)
    return ClipInputs(
        row=row,
        video=video.permute(1, 2, 3, 0).numpy(),
        masks=mask[0].numpy() > 0.5,
        photos=photos,
        prompt=prompt_of(row, data.prompt_from),
    )


def training_data_hashes(dataset_root: str | Path, split: str = "train") -> dict[str, str]:
    """{clip_key: content hash} of a split: what a model trained on that split has seen.

    The hash covers the clip, its masks, the product photos (the manifests' sha256 columns, as
    precompute's cache key) and the caption, so a re-built clip with changed content is new data.
    """
    root = DatasetRoot(Path(dataset_root).expanduser().resolve())
    return {
        item["clip_key"]: sha256_json(
            [item["video_sha256"], item["masks_sha256"], item["image_sha256"], item["caption"]]
        )
        for item in sorted(clip_items(root), key=lambda item: item["clip_key"])
        if item["split"] == split
    }


def generate_clip(
    pipe: ProductVideoPipeline,
    clip: ClipInputs,
    settings: EvaluateConfig,
    sampler: SamplerConfig,
    callback: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Generate the product into the blanked clip; (T, H, W, 3) float in [0, 1]."""
    device = pipe._execution_device
    mask = torch.from_numpy(clip.masks.astype(np.float32))[None, None]  # (1, 1, T, H, W)
    video = torch.from_numpy(clip.video).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W)
    blanked = video * (1 - mask)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    output = pipe(
        blanked,
        mask,
        [clip.photos],
        clip.prompt,
        negative_prompt=sampler.negative_prompt,
        num_inference_steps=settings.num_inference_steps,
        text_guidance_scale=settings.text_guidance_scale,
        product_guidance_scale=settings.product_guidance_scale,
        generator=generator,
        feather_px=sampler.feather_px,
        output_type="pt",
        callback=callback,
        attention_backend=sampler.attention,
        **sampler.guidance_options(),
    )
    return output[0].permute(1, 2, 3, 0).float().cpu().numpy()


def _jsonable_row(row: dict) -> dict:
    return {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in row.items()}


def write_rows(folder: Path, rows: Sequence[dict], summary: dict) -> None:
    """Per-clip rows as JSON lines and the split's summary, each written atomically."""
    out = DatasetRoot(folder)
    with out.atomic_file(ROWS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(_jsonable_row(r), sort_keys=True) + "\n" for r in rows))
    out.write_json(SUMMARY_FILE, summary)


def read_rows(folder: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / ROWS_FILE).read_text().splitlines() if line]


def evaluate_split(
    pipe: ProductVideoPipeline,
    run_config: RunConfig,
    dataset_root: str | Path,
    split: str,
    output_dir: str | Path,
    max_clips: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Generate and measure every clip of `split`; write rows, summary and videos under output_dir/<split>/.

    A clip too short for the frame window is skipped with its reason; a split with no usable
    clip is an EvaluationError. Returns {"split", "rows": per-clip rows, "overall": {metric:
    MetricValue}, "by_category": {category: {metric: MetricValue}}, "skipped", "folder"}.
    """
    settings, sampler = run_config.evaluate, run_config.model.sampler
    folder = Path(output_dir) / split
    out = DatasetRoot(folder)
    rows, skipped = [], []
    selected = split_rows(dataset_root, split, max_clips)
    for index, row in enumerate(selected, 1):
        try:
            clip = load_clip(dataset_root, row, run_config.data)
        except EvaluationError as error:
            skipped.append({"clip_key": row["clip_key"], "reason": str(error)})
            log(f"{split} {index}/{len(selected)} skipped: {error}")
            continue
        generated = generate_clip(pipe, clip, settings, sampler)
        metrics = m.evaluate_clip(generated, clip.video, clip.masks, clip.photos, settings.networks)
        rows.append({key: row[key] for key in IDENTITY_COLUMNS} | metrics)
        with out.atomic_file(f"videos/{row['clip_key']}.mp4") as tmp:
            write_video(tmp, np.round(generated * 255).astype(np.uint8), fps=row["fps"])
        log(
            f"{split} {index}/{len(selected)} {row['clip_key']}: "
            f"psnr_mask {m.value_of(metrics[m.PSNR_MASK]):.2f} dB, ssim_mask {m.value_of(metrics[m.SSIM_MASK]):.3f}"
        )
    if not rows:
        raise EvaluationError(
            f"no clip of split {split!r} could be evaluated: " + "; ".join(s["reason"] for s in skipped[:3])
        )
    summary = m.aggregate(rows, by="category")
    write_rows(folder, rows, {"split": split, "skipped": skipped, **summary})
    return {
        "split": split,
        "rows": rows,
        "overall": summary["overall"],
        "by_category": summary["by_category"],
        "skipped": skipped,
        "folder": str(folder),
    }


# The pipeline is an argument: results are not cached (a model is not a cache key) or persisted.
evaluate_split_task = task(
    evaluate_split, name="evaluate-split", cache_policy=NO_CACHE, persist_result=False, task_run_name="evaluate {split}"
)
