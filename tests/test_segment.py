"""Segment stage: post-processing, quality control, the classic backend and the stage end to end."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.segmenters import ClassicSegmenter, ClassicSettings, load_segmenter
from storage.hashing import sha256_files
from storage.images import load_mask_png
from storage.layout import DatasetRoot
from storage.schemas import to_table
from storage.video import work_size, write_video
from tasks.dataset.segment import (
    SegmentConfig,
    dilate,
    fill_holes,
    mask_stats,
    postprocess,
    quality_failure,
    remove_small_components,
    segment_clip,
    segment_task,
    temporal_majority,
    upsample,
)


def studio_clip(num_frames: int, height: int, width: int, two_products: bool = False, seed: int = 0):
    """Frames of textured products moving over a noisy studio gradient, and their true masks."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    # Light grey sweep: darker towards the floor, a little vignetting, sensor noise.
    backdrop = np.array([226, 228, 232], np.float32) - 28 * (ys / height)[..., None]
    backdrop -= 30 * (((xs - width / 2) / width) ** 2 + ((ys - height / 2) / height) ** 2)[..., None]
    texture = rng.integers(30, 200, (height // 6 + 1, width // 6 + 1, 3)).astype(np.uint8)
    texture = cv2.resize(texture, (width, height), interpolation=cv2.INTER_NEAREST)
    frames, truth = [], []
    for t in range(num_frames):
        mask = np.zeros((height, width), np.uint8)
        cx, cy = int(width * 0.35) + 3 * t, int(height * 0.5) + t
        cv2.ellipse(mask, (cx, cy), (width // 8, height // 5), 20 + t, 0, 360, 1, -1)
        # An opening through the product (like a ring's or a handle's): it is backdrop, not product.
        cv2.ellipse(mask, (cx + width // 20, cy), (width // 30, height // 12), 0, 0, 360, 0, -1)
        if two_products:
            x0 = int(width * 0.7) - 2 * t
            cv2.rectangle(mask, (x0, height // 3), (x0 + width // 8, int(height * 0.7)), 1, -1)
        inside = mask.astype(bool)
        img = backdrop + rng.normal(0, 2.5, (height, width, 3))
        img[inside] = texture[inside]
        # A small backdrop-coloured label on the product: post-processing must close that hole.
        lx = cx - width // 16
        img[cy - height // 80 : cy + height // 80, lx - width // 80 : lx + width // 80] = backdrop[cy, lx]
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        truth.append(inside)
    return np.stack(frames), np.stack(truth)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def square(t: int, h: int = 40, w: int = 60, y: int = 10, x: int = 10, size: int = 12) -> np.ndarray:
    masks = np.zeros((t, h, w), bool)
    masks[:, y : y + size, x : x + size] = True
    return masks


# -- post-processing ----------------------------------------------------------------------------


def test_temporal_majority_removes_one_frame_flicker():
    masks = square(5)
    masks[2] = False  # a dropped frame
    masks[3, 30:35, 40:45] = True  # a blob for one frame
    smoothed = temporal_majority(masks, 3)
    assert smoothed[2].sum() == 144  # restored by its neighbours
    assert not smoothed[3, 30:35, 40:45].any()
    assert (smoothed == square(5)).all()
    assert (temporal_majority(masks, 1) == masks).all()


def test_temporal_majority_keeps_a_thin_moving_product():
    masks = np.zeros((5, 40, 60), bool)
    for t in range(5):
        masks[t, 5:35, 10 + 4 * t : 12 + 4 * t] = True  # a 2 px wide bar moving 4 px per frame
    assert not temporal_majority(masks, 3, motion_px=0)[1:4].any()  # a plain vote erases it
    assert (temporal_majority(masks, 3, motion_px=4) == masks).all()


def test_small_components_removed_large_kept():
    masks = square(1)
    masks[0, 35:37, 50:52] = True  # 4 px speck
    cleaned = remove_small_components(masks, min_fraction=0.01)  # 24 px of 2400
    assert cleaned[0].sum() == 144 and not cleaned[0, 35:37, 50:52].any()


def test_small_holes_filled_large_openings_kept():
    masks = square(1, size=30)
    masks[0, 14:16, 14:16] = False  # 4 px: a label
    masks[0, 25:35, 25:35] = False  # 100 px: the inside of a ring
    filled = fill_holes(masks, max_fraction=0.01)  # 24 px of 2400
    assert filled[0, 14:16, 14:16].all() and not filled[0, 25:35, 25:35].any()
    assert fill_holes(masks, max_fraction=0.05)[0].sum() == 900


def test_work_size_keeps_aspect_and_never_upscales():
    assert work_size(480, 720, 240) == (240, 360)
    assert work_size(720, 480, 240) == (240, 160)
    assert work_size(96, 128, 240) == (96, 128) and work_size(480, 720, None) == (480, 720)


def test_upsampled_masks_land_within_a_pixel_of_the_full_size_ones():
    yy, xx = np.mgrid[:480, :720]
    full = ((yy - 230) / 90.0) ** 2 + ((xx - 370) / 140.0) ** 2 <= 1
    small = cv2.resize(full.astype(np.uint8) * 255, (360, 240), interpolation=cv2.INTER_AREA) > 127
    up = upsample(small[None], 480, 720, dilate_px=0)[0]
    assert up.shape == (480, 720) and iou(up, full) > 0.98
    assert iou(upsample(small[None], 480, 720, dilate_px=3)[0], dilate(full[None], 3)[0]) > 0.98


def test_dilation_grows_by_radius():
    grown = dilate(square(1), 2)
    assert grown[0].sum() > 144
    assert grown[0, 8, 15] and not grown[0, 7, 15]  # 2 px above the square's top edge (row 10)
    assert (dilate(square(1), 0) == square(1)).all()


# -- quality control ----------------------------------------------------------------------------


def failure(masks: np.ndarray, num_objects: int = 1, **overrides) -> tuple[str, str] | None:
    return quality_failure(mask_stats(masks), num_objects, SegmentConfig(backend="classic", **overrides))


def test_good_masks_pass():
    assert failure(square(4)) is None


def loses_two_thirds(masks: np.ndarray) -> np.ndarray:
    masks[-1, 14:22] = False  # the last frame keeps 4 of the square's 12 rows
    return masks


@pytest.mark.parametrize(
    ("make", "num_objects", "code"),
    [
        (lambda: square(4), 2, "multiple_products"),
        (lambda: np.zeros((4, 40, 60), bool), 0, "mask_empty"),
        (lambda: np.concatenate([square(3), np.zeros((1, 40, 60), bool)]), 1, "mask_empty"),
        (lambda: square(4, size=2), 1, "mask_too_small"),  # 4 px of 2400: 0.17%
        (lambda: square(4, y=0, x=0, size=40), 1, "mask_too_large"),  # 67%
        (lambda: loses_two_thirds(square(4)), 1, "mask_unstable"),
    ],
)
def test_each_quality_rule_rejects_with_its_code(make, num_objects, code):
    found = failure(make(), num_objects)
    assert found is not None and found[0] == code
    assert any(ch.isdigit() for ch in found[1])  # the message carries the measured numbers


def test_a_thin_product_panning_fast_is_stable():
    masks = np.zeros((4, 40, 60), bool)
    for t in range(4):
        masks[t, 5:35, 10 + 5 * t : 13 + 5 * t] = True  # moves 5 px per frame, 3 px wide: no overlap
    assert mask_stats(masks).temporal_iou_min == 1.0
    assert failure(masks) is None


def test_empty_frames_tolerated_up_to_the_threshold():
    masks = np.concatenate([square(19), np.zeros((1, 40, 60), bool)])
    assert failure(masks, max_empty_fraction=0.05) is None
    assert failure(masks, max_empty_fraction=0.0)[0] == "mask_empty"


# -- classic backend ----------------------------------------------------------------------------


def test_classic_iou_on_studio_frames_at_full_size():
    frames, truth = studio_clip(6, 480, 720)
    segmenter = ClassicSegmenter(ClassicSettings())
    start = time.perf_counter()
    found = segmenter.segment(frames, "a mug")
    ms_per_frame = (time.perf_counter() - start) / len(frames) * 1000
    masks = postprocess(found.masks, SegmentConfig(backend="classic"))
    ious = [iou(m, t) for m, t in zip(masks, truth)]
    assert found.num_objects == 1
    assert np.mean(ious) >= 0.9, ious
    print(f"classic: {ms_per_frame:.0f} ms per 480x720 frame, IoU {np.mean(ious):.3f}")


def test_classic_counts_two_separated_products():
    frames, _ = studio_clip(4, 240, 360, two_products=True)
    found = load_segmenter(SegmentConfig(backend="classic")).segment(frames, "a mug")
    assert found.num_objects == 2
    assert failure(found.masks, found.num_objects)[0] == "multiple_products"


# -- the stage end to end -----------------------------------------------------------------------


def write_clip(root: Path, frames: np.ndarray, key: str = "P001_c000") -> dict:
    ds = DatasetRoot.create(root)
    rel = ds.clip_video_rel(key)
    with ds.atomic_file(rel) as tmp:
        write_video(tmp, frames, fps=24)
    product_id, clip_id = key.split("_")
    return {"clip_key": key, "product_id": product_id, "clip_id": clip_id, "video_path": rel, "num_frames": len(frames)}


@pytest.mark.parametrize("work_height", [None, 120])
def test_segment_clip_writes_masks_and_row(tmp_path, work_height):
    frames, truth = studio_clip(8, 240, 360)
    clip = write_clip(tmp_path, frames)
    result = segment_clip(clip, "a mug", str(tmp_path), SegmentConfig(backend="classic", work_height=work_height))
    assert result["rejects"] == [] and len(result["rows"]) == 1
    row = result["rows"][0]
    to_table("masks", result["rows"])  # matches the manifest schema
    pngs = sorted((tmp_path / row["mask_dir"]).glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(8)]
    assert row["sha256"] == sha256_files(pngs)
    assert row["segmenter"] == "classic" and row["prompt"] == "a mug" and row["num_frames"] == 8
    masks = np.stack([load_mask_png(p) for p in pngs])
    assert masks.shape == (8, 240, 360)  # the clip's size, whatever size it was segmented at
    assert np.mean([iou(m, t) for m, t in zip(masks, truth)]) >= 0.9  # through H.264 too
    assert row["coverage_min"] <= row["coverage_mean"] <= row["coverage_max"]
    assert 0.6 <= row["temporal_iou_min"] <= 1.0
    assert not list(tmp_path.glob("masks/.tmp-*"))


def test_segment_clip_rejects_two_products_and_leaves_no_masks(tmp_path):
    frames, _ = studio_clip(8, 240, 360)
    clip = write_clip(tmp_path, frames)
    segment_clip(clip, "a mug", str(tmp_path), SegmentConfig(backend="classic"))
    assert (tmp_path / "masks" / "P001_c000").is_dir()
    # The clip changed (re-cut) and now shows two products: the earlier masks must go.
    two, _ = studio_clip(8, 240, 360, two_products=True)
    clip = write_clip(tmp_path, two)
    result = segment_clip(clip, "a mug", str(tmp_path), SegmentConfig(backend="classic"))
    assert result["rows"] == []
    (reject,) = result["rejects"]
    assert reject["reason_code"] == "multiple_products" and reject["item"] == "P001_c000"
    assert reject["product_id"] == "P001" and reject["clip_id"] == "c000"
    assert not (tmp_path / "masks" / "P001_c000").exists()


def test_segment_clip_rejects_unreadable_clip(tmp_path):
    ds = DatasetRoot.create(tmp_path)
    rel = ds.clip_video_rel("P001_c001")
    ds.path(rel).parent.mkdir(parents=True)
    ds.path(rel).write_bytes(b"not a video at all")
    clip = {"clip_key": "P001_c001", "product_id": "P001", "clip_id": "c001", "video_path": rel, "num_frames": 8}
    result = segment_clip(clip, "a mug", str(tmp_path), SegmentConfig(backend="classic"))
    assert result["rows"] == [] and result["rejects"][0]["reason_code"].startswith("video_")
    assert not (tmp_path / "masks").exists() or not any((tmp_path / "masks").iterdir())


def test_stage_is_a_prefect_task_named_segment():
    assert segment_task.name == "segment" and segment_task.fn is segment_clip


@pytest.mark.parametrize("side", [100, 400])  # 5,000 and 80,000 components: 16- and 32-bit labels
def test_connected_components_counts_every_component_of_a_checkerboard(side):
    from models.segmenters.base import connected_components

    board = (np.add.outer(np.arange(side), np.arange(side)) % 2).astype(bool)
    labels, stats = connected_components(board, connectivity=4)
    assert len(stats) - 1 == side * side // 2  # label 0 is the background
    assert labels.max() == side * side // 2 and (labels[board] > 0).all()
