"""Assembly: join the stage manifests into the dataset, split by product, write dataset.json.

Splits are by product (no product in two splits), stratified by category, 8:1:1 by default, and
sticky: a product keeps the split it had in the previous build of the same root. Rebuilding after
new products arrive therefore never moves a test product into training (which would make the new
model's test figures meaningless next to the old one's). New products go, in a seeded order, to
whichever split is furthest below its target share (within the category and overall).
"""

from __future__ import annotations

from collections import defaultdict

from pydantic import BaseModel, Field

from storage.hashing import sha256_json
from storage.rejects import reject_row

SPLITS = ("train", "val", "test")
STAGE = "assemble"


class SplitConfig(BaseModel):
    model_config = {"extra": "forbid"}  # a misspelt key in a build config is an error, not ignored
    seed: int = 20260123
    ratios: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train, val, test shares")


def assign_splits(categories: dict[str, str], previous: dict[str, str], cfg: SplitConfig) -> dict[str, str]:
    """{product_id: category} -> {product_id: split}, keeping `previous` assignments.

    A new product goes to the split furthest below its share within its category plus overall:
    large categories come out 8:1:1 each, and many small ones (a single product each, where a
    per-category rule would put every product in train) still fill val and test overall.
    """
    total = sum(cfg.ratios)
    shares = [r / total for r in cfg.ratios]
    by_category: dict[str, list[str]] = defaultdict(list)
    for pid, cat in categories.items():
        by_category[cat].append(pid)
    result = {pid: previous[pid] for pid in categories if previous.get(pid) in SPLITS}
    overall = dict.fromkeys(SPLITS, 0)
    for split in result.values():
        overall[split] += 1

    def deficits(counts: dict[str, int]) -> list[float]:
        n = sum(counts.values()) + 1
        return [shares[i] * n - counts[s] for i, s in enumerate(SPLITS)]

    for _category, pids in sorted(by_category.items()):
        in_category = dict.fromkeys(SPLITS, 0)
        for pid in pids:
            if pid in result:
                in_category[result[pid]] += 1
        for pid in sorted((p for p in pids if p not in result), key=lambda p: sha256_json([cfg.seed, p])):
            need = [a + b for a, b in zip(deficits(in_category), deficits(overall))]
            split = SPLITS[max(range(3), key=lambda i: (need[i], -i))]
            result[pid] = split
            in_category[split] += 1
            overall[split] += 1
    return result


def assemble(
    products: list[dict],
    clips: list[dict],
    masks: list[dict],
    masked_videos: list[dict],
    product_images: list[dict],
    previous_splits: dict[str, str],
    cfg: SplitConfig,
) -> tuple[list[dict], dict, list[dict]]:
    """-> (DATASET manifest rows, dataset.json object in the seed's schema, reject rows).

    A clip enters the dataset when it has masks and a masked video and its product has photos.
    """
    masks_by_key = {m["clip_key"]: m for m in masks}
    masked_by_key = {m["clip_key"]: m for m in masked_videos}
    images_by_product: dict[str, list[str]] = defaultdict(list)
    for img in product_images:
        images_by_product[img["product_id"]].append(img["image_path"])
    meta = {p["product_id"]: p for p in products}

    usable = [
        c
        for c in clips
        if c["clip_key"] in masks_by_key and c["clip_key"] in masked_by_key and images_by_product.get(c["product_id"])
    ]
    products_with_clips = {c["product_id"] for c in usable}
    rejects = []
    for pid in sorted(set(meta) - products_with_clips):
        if images_by_product.get(pid):
            reason = "no clip of this product survived scenes, segmentation and masking (see their rejects)"
            rejects.append(reject_row(STAGE, pid, "no_usable_clips", reason, pid))
    splits = assign_splits({pid: meta[pid]["category"] for pid in products_with_clips}, previous_splits, cfg)

    rows = []
    for c in sorted(usable, key=lambda c: c["clip_key"]):
        p = meta[c["product_id"]]
        rows.append(
            {
                "clip_key": c["clip_key"],
                "product_id": c["product_id"],
                "clip_id": c["clip_id"],
                "split": splits[c["product_id"]],
                "category": p["category"],
                "caption": p["caption"],
                "video_path": c["video_path"],
                "masked_video_path": masked_by_key[c["clip_key"]]["masked_video_path"],
                "mask_dir": masks_by_key[c["clip_key"]]["mask_dir"],
                "product_images": sorted(images_by_product[c["product_id"]]),
                "num_frames": c["num_frames"],
                "fps": c["fps"],
            }
        )
    seed_fields = (
        "product_id",
        "clip_id",
        "video_path",
        "masked_video_path",
        "mask_dir",
        "product_images",
        "caption",
        "num_frames",
        "fps",
    )
    dataset_json = {s: [{k: r[k] for k in seed_fields} for r in rows if r["split"] == s] for s in SPLITS}
    return rows, dataset_json, rejects
