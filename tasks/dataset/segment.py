"""Segment: one binary product mask per clip frame, post-processed and quality-checked.

```
clips row + product prompt -> masks/{clip_key}/{frame:05d}.png  (8-bit, 0 / 255)
                           -> one `masks` manifest row, or a reject row
```

Masks that fail quality control (empty, too small or large, flickering, several products) are
rejected and no mask file of the clip is left under the root: a clip trains the model only
with masks good enough to say exactly where the product is.

Segmentation, post-processing and quality control run on the clip downscaled to `work_height`
(240 of 480 lines by default: a quarter of the pixels, so about a quarter of the time); the masks
are then upsampled to the clip's size (bilinear on the 0/255 mask, so edges land within half a
working pixel) and dilated there. Pixel settings (`smoothing_motion_px`, `dilate_px`) are in clip
pixels whatever the working size. Quality control measures the working-size masks, before
dilation. (SAM2 itself predicts masks at 256 x 256 per 1024 x 1024 input.)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from models.segmenters import ClassicSettings, GroundedSam2Settings, load_segmenter
from models.segmenters.base import connected_components
from storage.hashing import sha256_files
from storage.images import save_png
from storage.layout import DatasetRoot
from storage.rejects import RejectError, reject_row
from storage.video import probe, read_video
from tasks.dataset.stage import StageResult, stage_task

STAGE = "segment"


class SegmentConfig(GroundedSam2Settings, ClassicSettings):
    """Backend choice and its settings (inherited), post-processing, and quality thresholds."""

    model_config = {"extra": "forbid"}  # a misspelt key in a build config is an error, not ignored
    backend: Literal["grounded-sam2", "classic"] = "grounded-sam2"
    work_height: int | None = Field(
        240, ge=16, description="segment at this height (aspect kept, never upscaled); None: at the clip's size"
    )
    # Post-processing, in this order: small components, holes, temporal vote, dilation.
    min_component_fraction: float = Field(
        0.001, ge=0, lt=1, description="drop components below this share of the frame"
    )
    fill_holes: bool = True
    max_hole_fraction: float = Field(0.001, ge=0, le=1, description="fill holes up to this share of the frame")
    smoothing_window: int = Field(3, ge=1, le=255, description="frames in the per-pixel temporal majority vote (odd)")
    smoothing_motion_px: int = Field(
        16, ge=0, description="motion between frames the vote tolerates before calling a pixel flicker"
    )
    dilate_px: int = Field(0, ge=0, description="grow masks by this many pixels (safety margin for inpainting)")
    # Quality control.
    min_coverage: float = Field(0.005, ge=0, le=1, description="smallest mask share of the frame (non-empty frames)")
    max_coverage: float = Field(0.6, gt=0, le=1, description="largest mask share of the frame")
    min_temporal_iou: float = Field(
        0.6, ge=0, le=1, description="smallest IoU of consecutive non-empty masks, centroids aligned"
    )
    max_empty_fraction: float = Field(0.0, ge=0, le=1, description="share of frames allowed without any mask")


# -- post-processing (pure, per clip) -----------------------------------------------------------


def remove_small_components(masks: np.ndarray, min_fraction: float) -> np.ndarray:
    """Drop connected components smaller than `min_fraction` of the frame, frame by frame."""
    min_area = min_fraction * masks[0].size
    out = np.zeros_like(masks)
    for i, mask in enumerate(masks):
        labels, stats = connected_components(mask, connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_area
        keep[0] = False  # label 0 is the background
        out[i] = keep[labels]
    return out


def fill_holes(masks: np.ndarray, max_fraction: float) -> np.ndarray:
    """Fill enclosed background regions up to `max_fraction` of the frame, frame by frame.

    Small holes are backdrop-coloured details of the product (a label, a highlight); large ones
    are real openings (the inside of a ring, a mug's handle) and stay background.
    """
    out = masks.copy()
    for i, mask in enumerate(masks):
        # The background's 4-connected components (as ndimage.binary_fill_holes floods): those
        # that do not touch the frame's edge are the holes. One labelling pass does both.
        labels, stats = connected_components(~mask, connectivity=4)
        small = stats[:, cv2.CC_STAT_AREA] <= max_fraction * mask.size
        small[0] = False  # label 0 is the mask itself
        small[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
        out[i] |= small[labels]
    return out


def temporal_majority(masks: np.ndarray, window: int, motion_px: int = 0) -> np.ndarray:
    """Per pixel, a majority vote over a centred window of frames (shrunk at the clip's ends).

    Removes one-frame flicker: a blob in one frame only, a hole or a drop-out in one frame only.
    A product moves between frames, and a thin one (a ring, a bracelet) moves by more than its own
    width, so a plain vote would erase it: a pixel that is on keeps its own vote and gets one from
    every neighbour frame with mask within `motion_px` of it (neighbours dilated); a pixel that is
    off turns on only on a plain majority of its neighbours.
    """
    if window <= 1:
        return masks.copy()
    half = window // 2
    t = len(masks)
    lo = np.clip(np.arange(t) - half, 0, t)
    hi = np.clip(np.arange(t) + half + 1, 0, t)
    majority = (hi - lo)[:, None, None] / 2

    def window_sum(stack: np.ndarray) -> np.ndarray:
        """Per frame, how many frames of its window (itself included) are on, per pixel: one
        uint8 pass per offset (a cumulative sum in int32 moves 8x the bytes)."""
        counts = stack.astype(np.uint8)
        for offset in range(1, half + 1):
            counts[: t - offset] += stack[offset:]  # the frame `offset` later
            counts[offset:] += stack[: t - offset]  # the frame `offset` earlier
        return counts

    near = dilate(masks, motion_px)
    keep = masks & (1 + window_sum(near) - near > majority)
    add = ~masks & (window_sum(masks) > majority)
    return keep | add


def dilate(masks: np.ndarray, px: int) -> np.ndarray:
    """Grow every mask by `px` pixels (a disc), e.g. to cover the product's soft edge."""
    if px <= 0:
        return masks.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel).astype(bool) for m in masks])


def postprocess(masks: np.ndarray, cfg: SegmentConfig, scale: float = 1.0) -> np.ndarray:
    """Components, holes and the temporal vote, on masks `scale` times the clip's size; dilation
    is left to `upsample` (it is in clip pixels)."""
    masks = remove_small_components(masks, cfg.min_component_fraction)
    if cfg.fill_holes:
        masks = fill_holes(masks, cfg.max_hole_fraction)
    return temporal_majority(masks, cfg.smoothing_window, round(cfg.smoothing_motion_px * scale))


def upsample(masks: np.ndarray, height: int, width: int, dilate_px: int) -> np.ndarray:
    """Masks at the clip's size: bilinear on 0/255 and a threshold at half, then `dilate_px`."""
    if masks.shape[1:] != (height, width):
        full = np.empty((len(masks), height, width), bool)
        for i, mask in enumerate(masks):
            full[i] = cv2.resize(mask.view(np.uint8) * 255, (width, height), interpolation=cv2.INTER_LINEAR) > 127
        masks = full
    return dilate(masks, dilate_px) if dilate_px else masks


# -- quality control ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskStats:
    coverage: np.ndarray  # (T,) mask share of each frame
    temporal_iou: np.ndarray  # (T-1,) aligned IoU of frames i and i+1; NaN where either mask is empty

    @property
    def empty_fraction(self) -> float:
        return float((self.coverage == 0).mean())

    @property
    def temporal_iou_min(self) -> float:
        """1.0 when no two consecutive frames both have a mask (nothing to compare)."""
        return float(np.nanmin(self.temporal_iou)) if np.isfinite(self.temporal_iou).any() else 1.0


def shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The mask moved by (dy, dx) pixels; what leaves the frame is lost, what enters is empty."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def aligned_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two non-empty masks after moving `a` onto `b`'s centroid.

    Stability means the mask keeps its shape, not that the product stands still: a thin product
    panning by its own width overlaps itself little from frame to frame, yet its mask is stable.
    """
    (ya, xa), (yb, xb) = (np.argwhere(m).mean(axis=0) for m in (a, b))
    moved = shift(a, round(yb - ya), round(xb - xa))
    return float((moved & b).sum() / (moved | b).sum())


def mask_stats(masks: np.ndarray) -> MaskStats:
    coverage = masks.reshape(len(masks), -1).mean(axis=1)
    iou = np.full(max(len(masks) - 1, 0), np.nan)
    for i in np.flatnonzero((coverage[:-1] > 0) & (coverage[1:] > 0)):
        iou[i] = aligned_iou(masks[i], masks[i + 1])
    return MaskStats(coverage=coverage, temporal_iou=iou)


def quality_failure(stats: MaskStats, num_objects: int, cfg: SegmentConfig) -> tuple[str, str] | None:
    """(reason_code, message with the measured numbers) of the first failed check, or None."""
    if num_objects > 1:
        return "multiple_products", f"{num_objects} distinct products found; a clip must show exactly one"
    non_empty = stats.coverage[stats.coverage > 0]
    if num_objects == 0 or not len(non_empty) or stats.empty_fraction > cfg.max_empty_fraction:
        return "mask_empty", (
            f"{stats.empty_fraction:.1%} of frames have an empty mask (allowed {cfg.max_empty_fraction:.1%}); "
            f"segmenter found {num_objects} product(s)"
        )
    if non_empty.min() < cfg.min_coverage:
        frame = int(np.flatnonzero(stats.coverage == non_empty.min())[0])
        return "mask_too_small", (
            f"mask covers {non_empty.min():.3%} of frame {frame} (minimum {cfg.min_coverage:.3%})"
        )
    if stats.coverage.max() > cfg.max_coverage:
        frame = int(stats.coverage.argmax())
        return "mask_too_large", (
            f"mask covers {stats.coverage.max():.1%} of frame {frame} (maximum {cfg.max_coverage:.1%})"
        )
    if stats.temporal_iou_min < cfg.min_temporal_iou:
        frame = int(np.nanargmin(stats.temporal_iou))
        return "mask_unstable", (
            f"masks of frames {frame} and {frame + 1} overlap with IoU {stats.temporal_iou_min:.2f} once "
            f"aligned (minimum {cfg.min_temporal_iou:.2f}): the mask changes shape between frames"
        )
    return None


# -- the stage ----------------------------------------------------------------------------------


def segment_clip(clip: dict, prompt: str, root: str, cfg: SegmentConfig) -> StageResult:
    """Masks for one `clips` row; `prompt` names the product for the text-prompted backend."""
    ds = DatasetRoot(Path(root).expanduser().resolve())  # the path guard compares resolved paths
    key = clip["clip_key"]
    mask_rel = ds.mask_dir_rel(key)

    def reject(code: str, reason: str) -> StageResult:
        # Masks of an earlier run of this clip must not outlive a rejection of this one.
        shutil.rmtree(ds.path(mask_rel), ignore_errors=True)
        return {"rows": [], "rejects": [reject_row(STAGE, key, code, reason, clip["product_id"], clip["clip_id"])]}

    path = ds.path(clip["video_path"])
    try:
        info = probe(path)
        frames = read_video(path, cfg.work_height)
    except RejectError as exc:
        return reject(exc.code, f"clip {clip['video_path']}: {exc}")

    segmenter = load_segmenter(cfg)
    found = segmenter.segment(frames, prompt)
    masks = postprocess(found.masks, cfg, scale=frames.shape[1] / info.height)
    stats = mask_stats(masks)
    failure = quality_failure(stats, found.num_objects, cfg)
    if failure:
        return reject(*failure)
    masks = upsample(masks, info.height, info.width, cfg.dilate_px)

    with ds.atomic_dir(mask_rel) as folder:
        pngs = [folder / f"{i:05d}.png" for i in range(len(masks))]
        for path, mask in zip(pngs, masks):
            save_png(path, mask.astype(np.uint8) * 255)
        digest = sha256_files(pngs)
    row = {
        "clip_key": key,
        "product_id": clip["product_id"],
        "clip_id": clip["clip_id"],
        "mask_dir": mask_rel,
        "num_frames": len(masks),
        "segmenter": segmenter.name,
        "prompt": prompt,
        "coverage_mean": float(stats.coverage.mean()),
        "coverage_min": float(stats.coverage.min()),
        "coverage_max": float(stats.coverage.max()),
        "temporal_iou_min": stats.temporal_iou_min,
        "sha256": digest,
    }
    return {"rows": [row], "rejects": []}


# Version 3: grounded-sam2 feeds SAM2 frames from memory (no JPEG round trip), which moves masks slightly.
# Version 4: its detector runs under bf16 autocast on CUDA, which moves scores slightly.
segment_task = stage_task(STAGE, "4")(segment_clip)
