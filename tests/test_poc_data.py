"""The PoC's rendered dataset (experiments/poc/render.py) and gate 1 (experiments/poc/brackets.py)."""

from __future__ import annotations

import itertools
import json
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from demo.studio import colourway_shape
from experiments.poc.brackets import measure_brackets
from experiments.poc.render import CUTOUT_SIZE, HEIGHT, PHOTO_VIEWS, WIDTH, poc_studio, render_poc_dataset
from storage.hashing import sha256_file
from storage.images import load_mask_png
from storage.layout import DatasetRoot
from storage.video import read_video
from tasks.training.precompute import clip_items, load_clip_window

PRODUCTS = 8  # two shapes of four colourways: enough for train, val and test


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> DatasetRoot:
    folder = tmp_path_factory.mktemp("poc") / "dataset"
    render_poc_dataset(folder, products=PRODUCTS, seed=0, workers=2)
    return DatasetRoot(folder.resolve())


def _rows_of(root: DatasetRoot, product_ids: set[str]) -> dict:
    names = ("clips", "masks", "masked_videos", "product_images")
    return {name: [r for r in root.read_manifest(name).to_pylist() if r["product_id"] in product_ids] for name in names}


def test_render_is_deterministic_from_the_seed(rendered, tmp_path):
    # Products are drawn per shape, so the first shape renders the same whatever the count.
    again = DatasetRoot((tmp_path / "again").resolve())
    render_poc_dataset(again.root, products=4, seed=0, workers=1)
    first_shape = {r["product_id"] for r in again.read_manifest("clips").to_pylist()}
    assert len(first_shape) == 4 and _rows_of(again, first_shape) == _rows_of(rendered, first_shape)
    seeds = [[c.spec.primary for c in colourway_shape(poc_studio(4, 4, seed), 0)] for seed in (0, 1)]
    assert seeds[0] != seeds[1]


def test_precompute_reads_the_rendered_dataset(rendered):
    items = clip_items(rendered)
    assert len(items) == PRODUCTS and {i["split"] for i in items} == {"train", "val", "test"}
    for item in items:
        assert item["video_sha256"] == sha256_file(rendered.path(item["video_path"]))[0]
        assert len(item["image_sha256"]) == len(PHOTO_VIEWS) and item["num_frames"] >= 72  # 3+ windows
    video, mask = load_clip_window(rendered, items[0]["video_path"], items[0]["mask_dir"], 17, 2, HEIGHT, WIDTH)
    assert video.shape == (3, 17, HEIGHT, WIDTH) and 0 < mask.mean() < 0.5


def test_the_text_is_the_category_word(rendered):
    for row in rendered.read_manifest("dataset").to_pylist():  # precompute encodes this caption
        assert row["caption"] == row["category"] in ("bottle", "box", "shoe", "mug")
    splits = json.loads((rendered.root / "dataset.json").read_text())
    truth = json.loads((rendered.root / "studio.json").read_text())
    assert all(r["caption"] == truth[r["product_id"]]["category"] for rows in splits.values() for r in rows)


def test_colourways_share_shape_and_motion_and_differ_in_colour(rendered):
    truth = json.loads((rendered.root / "studio.json").read_text())
    masks = {r["product_id"]: r["sha256"] for r in rendered.read_manifest("masks").to_pylist()}
    by_shape: dict[int, list[str]] = {}
    for pid, t in truth.items():
        by_shape.setdefault(t["shape_index"], []).append(pid)
    assert sorted(map(len, by_shape.values())) == [4, 4]
    for pids in by_shape.values():
        assert len({masks[p] for p in pids}) == 1  # same shape, same camera plan: the same true masks
        for a, b in itertools.combinations(pids, 2):
            rgb = [tuple(int(truth[p]["colours"]["primary"][i : i + 2], 16) for i in (1, 3, 5)) for p in (a, b)]
            assert math.dist(*rgb) >= 90, (a, b, rgb)


def test_masks_are_non_empty_and_match_the_sprite(rendered):
    rows = sorted(rendered.read_manifest("masks").to_pylist(), key=lambda r: r["clip_key"])
    assert all(r["coverage_min"] > 0.01 for r in rows)
    # Two colourways of one shape: the same backdrop, so their frames differ exactly where the product is.
    a, b = rows[0], rows[1]
    assert a["mask_dir"] != b["mask_dir"] and a["sha256"] == b["sha256"]
    frames = [read_video(rendered.path(f"video_clips/{r['clip_key']}.mp4")) for r in (a, b)]
    diff = np.abs(frames[0].astype(int) - frames[1].astype(int)).max(axis=3)
    for i in (0, len(diff) // 2, len(diff) - 1):
        mask = load_mask_png(rendered.path(a["mask_dir"]) / f"{i:05d}.png").astype(np.uint8)
        inside = np.percentile(diff[i][cv2.erode(mask, np.ones((5, 5), np.uint8)).astype(bool)], 10)
        outside = np.percentile(diff[i][~cv2.dilate(mask, np.ones((7, 7), np.uint8)).astype(bool)], 99)
        assert inside > 30 and outside < 8, (i, inside, outside)


def test_photos_are_rgba_cutouts_of_the_product(rendered):
    rows = rendered.read_manifest("product_images").to_pylist()
    assert len(rows) == PRODUCTS * len(PHOTO_VIEWS)
    for row in rows[:: len(PHOTO_VIEWS)]:
        rgba = np.asarray(Image.open(rendered.path(row["image_path"])))
        assert rgba.shape == (CUTOUT_SIZE, CUTOUT_SIZE, 4)
        assert 0.1 < (rgba[..., 3] > 127).mean() < 0.9 and rgba[0, 0, 3] == 0


def test_brackets_give_finite_figures_and_photos_beat_the_dataset_mean(rendered):
    result = measure_brackets(rendered.root, frames=9, stride=2)
    assert result["clips"] >= 1
    for clip in result["per_clip"].values():
        assert all(math.isfinite(v) for v in clip.values())
        assert clip["photo_mean"] > clip["dataset_mean"], clip
    assert result["margin_db"] == pytest.approx(
        result["summary"]["photo_mean"]["mean"] - result["summary"]["dataset_mean"]["mean"]
    )


def test_brackets_vae_round_trip(rendered, tmp_path):
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False], attn_scales=[]
    ).save_pretrained(tmp_path / "base" / "vae")
    result = measure_brackets(rendered.root, frames=5, stride=2, vae_folder=tmp_path / "base")
    vae = [clip["vae"] for clip in result["per_clip"].values()]
    assert all(math.isfinite(v) and v > 0 for v in vae)  # a random VAE: a number, not a good one


def test_vae_crops_hold_the_product_and_its_pixels_weigh_more(rendered):
    """The PoC VAE's training crops (experiments/poc/base.py) are placed around the product, so
    the product pixels the gate measures are in every crop; a window without product crops anywhere."""
    import torch

    from experiments.poc.base import CROP, product_crop, split_windows

    videos, masks = split_windows(rendered.root, "train", 17, 2, HEIGHT, WIDTH, limit=4)
    generator = torch.Generator().manual_seed(0)
    for mask in masks:
        for _ in range(8):
            top, left = product_crop(mask, generator)
            assert top % 8 == 0 and left % 8 == 0 and top + CROP[0] <= HEIGHT and left + CROP[1] <= WIDTH
            assert mask[..., top : top + CROP[0], left : left + CROP[1]].sum() > 0.5 * mask.sum() / mask.shape[1]
    empty = torch.zeros_like(masks[0])
    top, left = product_crop(empty, generator)
    assert 0 <= top <= HEIGHT - CROP[0] and 0 <= left <= WIDTH - CROP[1]
