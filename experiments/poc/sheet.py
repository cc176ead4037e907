"""The PoC's contact sheet: per test product, its photos, the masked frame, A's and B's generated
frame and the truth (the middle frame of the evaluated window), one row each."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from storage.images import save_png
from storage.video import read_video
from tasks.evaluate import load_clip, split_rows
from tasks.run_config import load_run_config

GAP = 4


def _fit_height(image: np.ndarray, height: int) -> np.ndarray:
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _row(tiles: list[np.ndarray]) -> np.ndarray:
    height = tiles[0].shape[0]
    gap = np.full((height, GAP, 3), 255, np.uint8)
    return np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)


def contact_sheet_png(dataset: Path, evaluations: dict[str, Path], output: Path, config: str = "configs/poc-synthetic.yaml",
                      products: int = 6) -> Path:
    """evaluations: {label: the evaluate flow's folder}, whose test/videos/<clip_key>.mp4 are read."""
    data = load_run_config(config).data
    rows, seen = [], set()
    for row in split_rows(dataset, "test"):
        if row["product_id"] in seen or len(seen) == products:
            continue
        videos = {label: folder / "test" / "videos" / f"{row['clip_key']}.mp4" for label, folder in evaluations.items()}
        if not all(path.is_file() for path in videos.values()):
            continue
        seen.add(row["product_id"])
        clip = load_clip(dataset, row, data)
        middle = len(clip.video) // 2
        truth = np.round(clip.video[middle] * 255).astype(np.uint8)
        masked = np.where(clip.masks[middle][..., None], 0, truth).astype(np.uint8)
        photos = [_fit_height(p, data.height // 2) for p in clip.photos]  # 2 x 2 photos per frame height
        stacked = [_row(photos[i:i + 2]) for i in range(0, len(photos), 2)]
        width = max(s.shape[1] for s in stacked)
        stacked = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in stacked]
        photo_block = np.concatenate(stacked, axis=0)[:data.height]
        photo_block = np.pad(photo_block, ((0, data.height - photo_block.shape[0]), (0, 0), (0, 0)),
                             constant_values=255)
        generated = [read_video(path)[middle] for path in videos.values()]
        rows.append(_row([photo_block, masked, *generated, truth]))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, GAP), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    output.parent.mkdir(parents=True, exist_ok=True)
    save_png(output, np.concatenate(rows, axis=0))
    return output
