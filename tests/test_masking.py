"""Masking stage: what survives outside the mask, what leaks inside it, deterministic noise, and
clips whose masks do not line up."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from storage.images import save_png
from storage.schemas import to_table
from storage.video import EncodeSettings, read_video, write_video
from tasks.dataset.masking import MaskConfig, fill_frame, mask_clip

T, H, W, FPS = 12, 64, 96, 24.0


def make_clip(root: Path, key: str = "P1_c0", frames: int = T) -> tuple[dict, dict, np.ndarray]:
    """A striped red/green product moving over a textured background, its masks, and the masks
    as an array. The clip is H.264 like the scenes stage writes it."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rng = np.random.default_rng(0)
    stripes = (np.sin(xx / 2 + yy / 3) > 0)[..., None]
    product = np.where(stripes, np.float32([250, 20, 30]), np.float32([20, 230, 40]))
    video, masks = [], []
    for t in range(frames):
        waves = (120 + 60 * np.sin(xx / 9 + t), 130 + 50 * np.cos(yy / 7), 110 + 40 * np.sin((xx + yy) / 11))
        background = np.stack(waves, axis=-1)
        mask = ((xx - 36 - 2 * t) / 22) ** 2 + ((yy - 32) / 18) ** 2 <= 1
        frame = np.where(mask[..., None], product, background) + rng.normal(0, 3, (H, W, 3))
        video.append(np.clip(frame, 0, 255).astype(np.uint8))
        masks.append(mask)
    (root / "video_clips").mkdir(parents=True, exist_ok=True)
    write_video(root / f"video_clips/{key}.mp4", video, FPS, EncodeSettings(crf=18))
    (root / f"masks/{key}").mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        save_png(root / f"masks/{key}/{i:05d}.png", mask.astype(np.uint8) * 255)
    product_id, clip_id = key.split("_")
    ids = {"clip_key": key, "product_id": product_id, "clip_id": clip_id, "num_frames": frames}
    clip = {**ids, "video_path": f"video_clips/{key}.mp4", "fps": FPS, "height": H, "width": W}
    return clip, {**ids, "mask_dir": f"masks/{key}/"}, np.stack(masks)


def erode(masks: np.ndarray, px: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1,) * 2)
    return np.stack([cv2.erode(m.astype(np.uint8), kernel).astype(bool) for m in masks])


def test_zero_fill_keeps_the_scene_and_blanks_the_product(tmp_path):
    clip, masks_row, masks = make_clip(tmp_path)
    result = mask_clip(clip, masks_row, str(tmp_path), MaskConfig())

    assert result["rejects"] == []
    [row] = result["rows"]
    to_table("masked_videos", [row])
    file = tmp_path / row["masked_video_path"]
    assert row["masked_video_path"] == "masked_videos/P1_c0.mp4"
    assert row["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()

    original, masked = read_video(tmp_path / clip["video_path"]).astype(int), read_video(file).astype(int)
    assert masked.shape == original.shape
    outside = erode(~masks, 2)  # away from the edge, where the codec mixes both sides
    assert np.abs(masked - original)[outside].mean() < 5  # a second H.264 generation of a noisy clip
    inside = erode(masks, 2)
    assert masked[inside].mean() < 2
    # The recorded figures are what the file holds: recompute them independently.
    leak = masked.max(axis=3)[inside]
    assert row["leakage_mean"] == pytest.approx(leak.mean(), abs=1e-6)
    assert row["leakage_p99"] == pytest.approx(np.percentile(leak, 99, method="inverted_cdf"))
    assert row["leakage_mean"] < 2 and 0 < row["leakage_p99"] < 16


def test_noise_fill_is_deterministic_per_clip(tmp_path):
    def masked_video(name: str, cfg: MaskConfig) -> np.ndarray:
        clip, masks_row, _ = make_clip(tmp_path / name)
        [row] = mask_clip(clip, masks_row, str(tmp_path / name), cfg)["rows"]
        assert row["fill"] == "noise"
        return read_video(tmp_path / name / row["masked_video_path"]).astype(int)

    cfg = MaskConfig(fill="noise")
    assert np.array_equal(fill_frame(H, W, 3, "P1_c0", cfg), fill_frame(H, W, 3, "P1_c0", cfg))
    assert not np.array_equal(fill_frame(H, W, 3, "P1_c0", cfg), fill_frame(H, W, 3, "P1_c1", cfg))
    assert not np.array_equal(fill_frame(H, W, 3, "P1_c0", cfg), fill_frame(H, W, 4, "P1_c0", cfg))

    # The files are compared decoded, not by hash: libx264's macroblock tree (mbtree) makes two
    # encodes of the same frames differ slightly, even with one thread.
    first, again = masked_video("a", MaskConfig(fill="noise")), masked_video("b", MaskConfig(fill="noise"))
    other_seed = masked_video("c", MaskConfig(fill="noise", noise_seed=1))
    inside = erode(make_clip(tmp_path / "d")[2], 2)
    assert first[inside].std() > 40  # noise, not a flat fill
    assert np.abs(first[..., 0] - first[..., 2])[inside].mean() < 3  # grey: no chroma to smear
    assert np.abs(first - again)[inside].mean() < 5
    assert np.abs(first - other_seed)[inside].mean() > 40


@pytest.mark.parametrize(
    "break_it, code",
    [
        ("masks_row_frames", "frame_count_mismatch"),
        ("short_video", "frame_count_mismatch"),
        ("missing_png", "mask_missing"),
        ("corrupt_png", "mask_unreadable"),
        ("missing_video", "video_unreadable"),
    ],
)
def test_clips_whose_masks_do_not_line_up_are_rejected(tmp_path, break_it, code):
    clip, masks_row, _ = make_clip(tmp_path)
    if break_it == "masks_row_frames":
        masks_row["num_frames"] = T - 1
    elif break_it == "short_video":  # the manifests agree, the file has fewer frames
        make_clip(tmp_path, frames=T - 3)
        for i in range(T - 3, T):
            save_png(tmp_path / f"masks/P1_c0/{i:05d}.png", np.zeros((H, W), np.uint8))
    elif break_it == "missing_png":
        (tmp_path / "masks/P1_c0/00003.png").unlink()
    elif break_it == "corrupt_png":
        (tmp_path / "masks/P1_c0/00005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    else:
        (tmp_path / clip["video_path"]).unlink()

    result = mask_clip(clip, masks_row, str(tmp_path), MaskConfig())

    assert result["rows"] == []
    [reject] = result["rejects"]
    assert (reject["stage"], reject["item"], reject["reason_code"]) == ("masking", "P1_c0", code)
    assert (reject["product_id"], reject["clip_id"]) == ("P1", "c0")
    assert not (tmp_path / "masked_videos").exists() or list((tmp_path / "masked_videos").iterdir()) == []


def test_leakage_above_the_bound_rejects_the_clip_and_removes_its_file(tmp_path):
    clip, masks_row, _ = make_clip(tmp_path)
    first = mask_clip(clip, masks_row, str(tmp_path), MaskConfig())
    assert (tmp_path / first["rows"][0]["masked_video_path"]).exists()

    result = mask_clip(clip, masks_row, str(tmp_path), MaskConfig(max_leakage_p99=0.5))

    assert result["rows"] == []
    [reject] = result["rejects"]
    assert reject["reason_code"] == "mask_leakage"
    assert f"p99 {first['rows'][0]['leakage_p99']:.1f}" in reject["reason"]
    assert list((tmp_path / "masked_videos").iterdir()) == []
