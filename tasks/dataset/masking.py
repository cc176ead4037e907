"""Masking stage: a clip and its masks -> the masked video the model is conditioned on.

Each frame becomes `frame * (1 - mask)` (fill "zero") or noise inside the mask (fill "noise"),
encoded as H.264 to `masked_videos/{clip_key}.mp4`, streamed frame by frame. The file is then
decoded and the product colour that survived the codec inside the mask is measured; a clip above
`max_leakage_p99` is rejected, since a model trained on it could copy the product from its input.

Where the model can, it should build masked frames from the clip and the mask PNGs itself
(lossless; `fill_frame` gives the same fill); this file is for loaders that read videos, and for
looking at.

Why leakage is measured on the mask eroded by `leakage_erode_px` (MEASURED below): H.264 codes
colour at half resolution (4:2:0) and in 4x4/8x8 transform blocks, so the first pixels inside the
mask edge always mix with the product next to them; that ring shows the outline the mask already
gives away. Colour deeper inside would be real leakage, and the codec quality (crf) controls it.

MEASURED (49 frames of 256 x 384, 24 fps: a red/green-striped ellipse moving over a textured
background, the clip itself H.264 crf 18 as the scenes stage writes it; preset veryfast; leakage =
largest channel difference from the fill per pixel, 0..255, "mean / p99" over all frames):

    fill   crf  file     whole mask   eroded 1 px  eroded 2 px  eroded 3 px  eroded 4 px
    zero   10   633 KiB  0.66 / 15    0.32 / 5     0.20 / 4     0.16 / 3     0.12 / 3
    zero   14   451 KiB  0.74 / 15    0.41 / 7     0.27 / 5     0.21 / 4     0.15 / 3
    zero   18   322 KiB  0.86 / 16    0.53 / 9     0.36 / 6     0.28 / 5     0.20 / 4
    zero   23    52 KiB  1.15 / 20    0.75 / 12    0.54 / 9     0.42 / 7     0.31 / 6
    zero   28    24 KiB  1.55 / 28    0.98 / 16    0.68 / 11    0.52 / 8     0.38 / 6
    noise  18   382 KiB  2.07 / 25    1.54 / 13    1.26 / 9     1.12 / 8     1.00 / 7
    noise  23   100 KiB  2.70 / 28    2.13 / 18    1.76 / 13    1.56 / 11    1.39 / 9

So the edge ring dominates the whole-mask p99 at every crf, and lowering crf barely shrinks it;
two pixels in, crf 18 keeps the p99 at 6 (noise 9). Smaller masks and finer, harsher textures
leak more: the tests' 64 x 96 clip (stripes of ~10 px period, +-230 levels, on a 44 x 36 px
ellipse) measures p99 11 at crf 18 (noise 14), 15 at crf 23, 23 at crf 30. Defaults: crf 18
(below it files grow fast for little gain), leakage two pixels inside the edge, and a bound of
16, which such content passes up to crf 23 and fails at crf 30, where the ringing is visible.

Noise fill: noise must survive H.264 for the figure to mean anything. Alone in a 256 x 384 video
at crf 18 (mean / p99 of |decoded - noise|): per-pixel RGB noise 77 / 172, RGB noise in 8 x 8
blocks 11 / 34, in 16 x 16 blocks 5.4 / 28 (chroma is resampled across block edges), per-pixel
grey noise 5.6 / 18, grey in 8 x 8 blocks 1.8 / 7, grey in 16 x 16 blocks 0.5 / 1. So the noise
is grey, constant over 16 x 16 blocks aligned with the macroblocks, new each frame, seeded by the
clip key and `noise_seed`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, Field

from storage.hashing import sha256_file
from storage.images import load_mask_png
from storage.layout import DatasetRoot
from storage.rejects import RejectError, reject_row
from storage.video import EncodeSettings, VideoWriter, iter_frames
from tasks.dataset.stage import StageResult, stage_task

STAGE = "masking"
NOISE_BLOCK = 16  # pixels: one H.264 macroblock


class MaskConfig(BaseModel):
    model_config = {"extra": "forbid"}  # a misspelt key in a build config is an error, not ignored
    fill: Literal["zero", "noise"] = "zero"
    noise_seed: int = 0  # combined with the clip key: the same clip always gets the same noise
    crf: int = Field(18, ge=0, le=51)
    preset: str = "veryfast"
    # Leakage is measured this many pixels inside the mask edge (see the module docstring).
    leakage_erode_px: int = Field(2, ge=0)
    max_leakage_p99: float = Field(16.0, ge=0.0)


@dataclass
class Leakage:
    """Histogram of |decoded - fill| (largest channel per pixel) over the measured pixels.

    A clip whose masks are all empty has nothing to leak into: its figures are 0.
    """

    counts: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))

    def add(self, decoded: np.ndarray, fill: np.ndarray, region: np.ndarray) -> None:
        diff = cv2.absdiff(decoded, fill)[region]  # (pixels, 3); ndarray.max(axis=1) is much slower
        self.counts += np.bincount(np.maximum(np.maximum(diff[:, 0], diff[:, 1]), diff[:, 2]), minlength=256)

    @property
    def mean(self) -> float:
        total = self.counts.sum()
        return float(self.counts @ np.arange(256) / total) if total else 0.0

    @property
    def p99(self) -> float:
        total = self.counts.sum()
        return float(np.searchsorted(np.cumsum(self.counts), 0.99 * total)) if total else 0.0


def mask_clip(clip: dict, masks: dict, root: str, cfg: MaskConfig) -> StageResult:
    """Write the masked video of one clip; a row with its leakage, or a reject row."""
    out = DatasetRoot(Path(root))
    key = clip["clip_key"]
    rel = DatasetRoot.masked_video_rel(key)
    try:
        mask_paths = _mask_paths(clip, masks, out)
        video = out.path(clip["video_path"])
        with out.atomic_file(rel) as tmp:
            regions = _encode(video, mask_paths, tmp, clip, cfg)
            leakage = _measure(tmp, regions, clip, cfg)
            if leakage.p99 > cfg.max_leakage_p99:
                raise RejectError(
                    "mask_leakage",
                    f"product colour inside the mask after H.264: p99 {leakage.p99:.1f} "
                    f"(mean {leakage.mean:.2f}) > max_leakage_p99 {cfg.max_leakage_p99} at crf {cfg.crf}",
                )
            digest = sha256_file(tmp)[0]
    except RejectError as exc:
        # An earlier run's file for this clip no longer belongs to the dataset.
        out.path(rel).unlink(missing_ok=True)
        reject = reject_row(STAGE, key, exc.code, str(exc), clip["product_id"], clip["clip_id"])
        return {"rows": [], "rejects": [reject]}
    row = {
        "clip_key": key,
        "product_id": clip["product_id"],
        "clip_id": clip["clip_id"],
        "masked_video_path": rel,
        "fill": cfg.fill,
        "leakage_mean": leakage.mean,
        "leakage_p99": leakage.p99,
        "sha256": digest,
    }
    return {"rows": [row], "rejects": []}


def _mask_paths(clip: dict, masks: dict, out: DatasetRoot) -> list[Path]:
    """The clip's mask PNGs in frame order, after checking they are all there."""
    if masks["clip_key"] != clip["clip_key"]:
        raise RejectError("mask_mismatch", f"masks row is for {masks['clip_key']!r}, not {clip['clip_key']!r}")
    n = clip["num_frames"]
    if masks["num_frames"] != n:
        raise RejectError("frame_count_mismatch", f"clip has {n} frames, its masks {masks['num_frames']}")
    folder = out.path(masks["mask_dir"])
    paths = [folder / f"{i:05d}.png" for i in range(n)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        listed = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise RejectError("mask_missing", f"{len(missing)} of {n} mask PNGs missing in {masks['mask_dir']}: {listed}")
    return paths


def _frames_with_masks(video: Path, mask_paths: list[Path]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(index, RGB frame, boolean mask), one frame in memory at a time; raises RejectError when
    the video and its masks do not line up."""
    count = 0
    for i, (_, frame) in enumerate(iter_frames(video)):
        if i >= len(mask_paths):
            raise RejectError("frame_count_mismatch", f"{video.name} has more frames than its {len(mask_paths)} masks")
        mask = _load_mask(mask_paths[i])
        if mask.shape != frame.shape[:2]:
            raise RejectError(
                "mask_size_mismatch",
                f"mask {mask_paths[i].name} is {mask.shape[1]}x{mask.shape[0]}, "
                f"the frame {frame.shape[1]}x{frame.shape[0]}",
            )
        count += 1
        yield i, frame, mask
    if count != len(mask_paths):
        raise RejectError("frame_count_mismatch", f"{video.name} decodes to {count} frames, {len(mask_paths)} masks")


def _load_mask(path: Path) -> np.ndarray:
    try:
        return load_mask_png(path)
    except (OSError, ValueError) as exc:  # PIL's errors for truncated or non-image files
        raise RejectError("mask_unreadable", f"mask {path.name} is not a readable PNG: {exc}") from exc


def fill_frame(h: int, w: int, index: int, clip_key: str, cfg: MaskConfig) -> np.ndarray:
    """What the masked region of frame `index` is replaced with (H x W x 3 uint8); the same for
    the same clip, frame and config, so a loader can rebuild masked frames from clip + masks."""
    if cfg.fill == "zero":
        return np.zeros((h, w, 3), np.uint8)
    clip_seed = int.from_bytes(hashlib.sha256(clip_key.encode()).digest()[:8], "big")
    rng = np.random.default_rng([cfg.noise_seed, clip_seed, index])
    grey = rng.integers(0, 256, (-(-h // NOISE_BLOCK), -(-w // NOISE_BLOCK)), dtype=np.uint8)
    grey = np.repeat(np.repeat(grey, NOISE_BLOCK, axis=0), NOISE_BLOCK, axis=1)[:h, :w]
    return np.repeat(grey[..., None], 3, axis=2)


def _encode(video: Path, mask_paths: list[Path], target: Path, clip: dict, cfg: MaskConfig) -> list[np.ndarray]:
    """Write the masked video; returns, per frame, the region its leakage is measured on (the mask
    eroded by leakage_erode_px; all of it where the mask is thinner), so `_measure` reads no PNG again."""
    size = (clip["height"], clip["width"])
    settings = EncodeSettings(crf=cfg.crf, preset=cfg.preset)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cfg.leakage_erode_px + 1,) * 2)
    regions = []
    with VideoWriter(target, clip["fps"], *size, settings) as writer:
        for i, frame, mask in _frames_with_masks(video, mask_paths):
            if frame.shape[:2] != size:
                raise RejectError(
                    "frame_size_mismatch",
                    f"{video.name} decodes to {frame.shape[1]}x{frame.shape[0]}, "
                    f"the clips row says {size[1]}x{size[0]}",
                )
            cv2.copyTo(fill_frame(*size, i, clip["clip_key"], cfg), mask.view(np.uint8), frame)  # in place
            writer.write(frame)
            region = cv2.erode(mask.view(np.uint8), kernel).view(bool)
            regions.append(region if region.any() else mask)
    return regions


def _measure(encoded: Path, regions: list[np.ndarray], clip: dict, cfg: MaskConfig) -> Leakage:
    """Decode the written file and histogram |decoded - fill| inside each frame's region."""
    leakage = Leakage()
    # strict: the file must decode to the frames just written, one region each
    for i, ((_, decoded), region) in enumerate(zip(iter_frames(encoded), regions, strict=True)):
        if region.any():
            leakage.add(decoded, fill_frame(*decoded.shape[:2], i, clip["clip_key"], cfg), region)
    return leakage


masking_task = stage_task("masking", "1")(mask_clip)
