"""The PoC's data, rendered straight into a dataset root (issue 14): the studio's colourway look.

A product is (shape + camera plan, colourway): `colourways` products share a kind, shape and
videos and differ only in their colours and their photos, so a model can take a product's
colours from its photos and from nowhere else. Each product gets one clip of 72-96 frames at
128 x 192 (H x W), 24 fps (room for 3+ windows of 17 frames at stride 2), the studio's TRUE
masks, the masked video of the masking stage, and 4 RGBA photo cut-outs of 128 x 128 from the
studio's true alpha. The files and manifests are those build-dataset writes (storage/layout.py,
storage/schemas.py), so precompute, train and evaluate read them through the flows unchanged.

What the model reads as text is the dataset's `caption` column (tasks/training/precompute.py encodes it):
here it holds the product's prompt, the category word alone, so no colour comes from the text.
The describing captions, colours and shape of every product are in `studio.json`.

Splits: by product (tasks.dataset.assemble, 80/10/10, seeded, stratified by category), so a test product
(shape + colourway) is never seen in training, while its shape usually is, in other colours:
that is what makes colours unmemorisable. The segmenter is not under test here: masks are true.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from demo.studio import (
    VIEWS,
    Colourway,
    StudioConfig,
    colourway_shape,
    plan_video,
    render_photo,
    render_video,
    unit_radius,
)
from storage.hashing import sha256_file, sha256_files, sha256_json
from storage.images import save_png
from storage.layout import DatasetRoot, clip_key
from storage.video import EncodeSettings, VideoWriter
from tasks.dataset.assemble import SPLITS, SplitConfig, assemble
from tasks.dataset.masking import MaskConfig, mask_clip
from tasks.dataset.product_images import ImageConfig, square_cutout
from tasks.dataset.segment import mask_stats

HEIGHT, WIDTH, FPS = 128, 192, 24.0
CLIP_SECONDS = (3.0, 4.0)  # 72-96 frames
PHOTO_VIEWS = VIEWS[:4]  # front, side, back, detail: max_product_images is 4
PHOTO_SIZE, CUTOUT_SIZE = 192, 128
CLIP_ID = "c1"
# Kinds whose body is broad enough to carry colour at the latent scale (ring and bracelet bands
# are 4-8 px, a watch is mostly its dark dial).
KINDS = ("bottle", "box", "shoe", "mug")
SEGMENTER = "studio-truth"
BACKGROUND_REMOVAL = "studio-alpha"
MANIFEST_NAMES = ("products", "clips", "masks", "masked_videos", "product_images")


def poc_studio(products: int, colourways: int, seed: int) -> StudioConfig:
    """The studio of the PoC: colourway look, one landscape shot of 3-4 s a product."""
    return StudioConfig(
        num_products=products,
        seed=seed,
        look="colourway",
        colourways=colourways,
        width=WIDTH,
        height=HEIGHT,
        fps=FPS,
        videos_per_product=(1, 1),
        shots_per_video=(1, 1),
        shot_seconds=CLIP_SECONDS,
        images_per_product=(4, 4),
        image_size=PHOTO_SIZE,
        portrait_fraction=0.0,
        kinds=KINDS,
    )


def _write_clip(root: DatasetRoot, product: Colourway, cfg: StudioConfig) -> tuple[dict, dict]:
    """Render, encode and write one clip and its true masks -> (clips row, masks row)."""
    spec, rng = product.spec, product.scene_rng()
    shots = plan_video(rng, cfg, WIDTH, HEIGHT, unit_radius(spec))
    key = clip_key(spec.product_id, CLIP_ID)
    video_rel, mask_rel = root.clip_video_rel(key), root.mask_dir_rel(key)
    masks = []
    with root.atomic_file(video_rel) as tmp, root.atomic_dir(mask_rel) as mask_dir:
        with VideoWriter(tmp, cfg.fps, HEIGHT, WIDTH, EncodeSettings()) as writer:
            for i, (frame, mask) in enumerate(render_video(rng, spec, shots, WIDTH, HEIGHT, cfg.grain_sigma)):
                writer.write(frame)
                save_png(mask_dir / f"{i:05d}.png", mask)
                masks.append(mask > 127)
        video_sha, _ = sha256_file(tmp)
        masks_sha = sha256_files(sorted(mask_dir.glob("*.png")))
    stats = mask_stats(np.stack(masks))
    common = {"clip_key": key, "product_id": spec.product_id, "clip_id": CLIP_ID, "num_frames": len(masks)}
    clip = common | {
        "source_uri": f"studio://seed-{cfg.seed}/{spec.product_id}",
        "start_s": 0.0,
        "source_sha256": sha256_json({"seed": cfg.seed, "product": spec.product_id}),
        "end_s": len(masks) / cfg.fps,
        "fps": cfg.fps,
        "height": HEIGHT,
        "width": WIDTH,
        "video_path": video_rel,
        "sha256": video_sha,
    }
    mask_row = common | {
        "mask_dir": mask_rel,
        "segmenter": SEGMENTER,
        "prompt": spec.kind,
        "coverage_mean": float(stats.coverage.mean()),
        "coverage_min": float(stats.coverage.min()),
        "coverage_max": float(stats.coverage.max()),
        "temporal_iou_min": stats.temporal_iou_min,
        "sha256": masks_sha,
    }
    return clip, mask_row


def _write_photos(root: DatasetRoot, product: Colourway) -> list[dict]:
    """The product's studio photos as RGBA cut-outs from the true alpha -> product_images rows."""
    spec, rng, margin = product.spec, product.photo_rng(), ImageConfig().margin
    rows = []
    for view in PHOTO_VIEWS:
        rgb, alpha = render_photo(rng, spec, view, PHOTO_SIZE)
        rel = root.product_image_rel(spec.product_id, view)
        with root.atomic_file(rel) as tmp:
            save_png(tmp, square_cutout(rgb, alpha, alpha > 0.5, CUTOUT_SIZE, margin))
            digest, _ = sha256_file(tmp)
        rows.append(
            {
                "product_id": spec.product_id,
                "view": view,
                "image_path": rel,
                "source_name": f"{view}.png",
                "source_sha256": sha256_json({"product": spec.product_id, "view": view}),
                "background_removal": BACKGROUND_REMOVAL,
                "foreground_fraction": float((alpha > 0.5).mean()),
                "sha256": digest,
            }
        )
    return rows


def _truth(product: Colourway) -> dict:
    spec = product.spec
    return {
        "category": spec.kind,
        "caption": spec.caption,
        "shape_index": product.shape_index,
        "colourway": product.colourway,
        "texture": spec.texture,
        "shape": spec.shape,
        "colours": {
            name: "#%02x%02x%02x" % rgb
            for name, rgb in (("primary", spec.primary), ("secondary", spec.secondary), ("accent", spec.accent))
        },
    }


def render_shape(task: tuple[str, StudioConfig, int]) -> dict[str, list[dict]]:
    """All colourways of one shape (one Pool task) -> manifest rows by name, and their truth."""
    folder, cfg, shape_index = task
    root = DatasetRoot(Path(folder))
    rows: dict[str, list[dict]] = {name: [] for name in (*MANIFEST_NAMES, "truth")}
    for product in colourway_shape(cfg, shape_index):
        spec = product.spec
        clip, masks = _write_clip(root, product, cfg)
        masked = mask_clip(clip, masks, str(root.root), MaskConfig())
        if masked["rejects"]:
            raise RuntimeError(f"masking set aside {clip['clip_key']}: {masked['rejects'][0]['reason']}")
        rows["clips"].append(clip)
        rows["masks"].append(masks)
        rows["masked_videos"] += masked["rows"]
        rows["product_images"] += _write_photos(root, product)
        # caption = the prompt: the category word is all the text the model gets
        rows["products"].append(
            {
                "product_id": spec.product_id,
                "category": spec.kind,
                "caption": spec.kind,
                "prompt": spec.kind,
                "num_videos": 1,
                "num_images": len(PHOTO_VIEWS),
            }
        )
        rows["truth"].append({"product_id": spec.product_id, **_truth(product)})
    return rows


def _rendered(folder: Path, cfg: StudioConfig, workers: int) -> Iterator[dict[str, list[dict]]]:
    shapes = -(-cfg.num_products // cfg.colourways)
    tasks = [(str(folder), cfg, index) for index in range(shapes)]
    if workers <= 1:
        yield from map(render_shape, tasks)
        return
    with Pool(workers) as pool:
        yield from pool.imap(render_shape, tasks)


def render_poc_dataset(
    folder: Path, products: int = 1000, colourways: int = 4, seed: int = 0, workers: int = 1
) -> dict:
    """Render `products` products (whole shapes: rounded up to a multiple of `colourways`) into the
    dataset root `folder` (new or empty); returns a summary. Deterministic from `seed`."""
    started = time.perf_counter()
    root = DatasetRoot.create(folder)
    if any(p.name != ".cache" for p in root.root.iterdir()):
        raise FileExistsError(f"{root.root} is not empty: render into a new or empty folder")
    cfg = poc_studio(-(-products // colourways) * colourways, colourways, seed)
    manifests: dict[str, list[dict]] = {name: [] for name in (*MANIFEST_NAMES, "truth")}
    for rows in _rendered(root.root, cfg, workers):
        for name, part in rows.items():
            manifests[name] += part
    truth = {row.pop("product_id"): row for row in manifests.pop("truth")}
    dataset_rows, dataset_json, rejects = assemble(*(manifests[name] for name in MANIFEST_NAMES), {}, SplitConfig())
    if rejects:
        raise RuntimeError(f"assembly set aside {len(rejects)} products, e.g. {rejects[0]['reason']}")
    for name, rows in manifests.items():
        root.write_manifest(name, rows)
    root.write_manifest("dataset", dataset_rows)
    root.write_json("dataset.json", dataset_json)
    root.write_json("studio.json", truth)
    return summarise(dataset_rows, truth, time.perf_counter() - started)


def summarise(dataset_rows: list[dict], truth: dict, seconds: float) -> dict:
    """Clips per split, and how many test products have their shape in train (in other colours)."""
    split_of = {row["product_id"]: row["split"] for row in dataset_rows}
    train_shapes = {truth[p]["shape_index"] for p, split in split_of.items() if split == "train"}
    test = [p for p, split in split_of.items() if split == "test"]
    return {
        "products": len(split_of),
        "shapes": len({t["shape_index"] for t in truth.values()}),
        "clips_per_split": {s: sum(r["split"] == s for r in dataset_rows) for s in SPLITS},
        "frames": sum(r["num_frames"] for r in dataset_rows),
        "test_products_whose_shape_is_in_train": sum(truth[p]["shape_index"] in train_shapes for p in test),
        "seconds": round(seconds, 1),
    }
