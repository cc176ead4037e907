"""Product images stage: a product's photos -> 3-5 square cut-outs on a transparent background.

Each photo is decoded safely (storage.images.load_photo), its background removed (a real alpha
channel in the photo wins over any backend), cropped to the product plus a small margin, scaled to
fit `size` x `size` keeping its aspect ratio, centred and written as RGBA PNG to
`product_images/{product_id}/{view}.png`. A product keeps at most `max_images` views (front, side,
back, detail, top, scene first); with fewer than `min_images` usable photos it is rejected whole
and nothing of it stays on disk: its folder is written atomically, all views or none.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, Field, model_validator

from models.background import is_model_file, remove_background
from storage.hashing import sha256_file
from storage.images import MAX_PIXELS, load_photo, save_png
from storage.layout import DatasetRoot, UnsafeNameError, check_safe_name
from storage.rejects import RejectError, reject_row
from tasks.dataset.stage import StageResult, stage_task

STAGE = "product_images"

# Views the product encoder benefits from most, best first; other names come after, by name.
PREFERRED_VIEWS = ("front", "side", "back", "detail", "top", "scene")


class ImageConfig(BaseModel):
    model_config = {"extra": "forbid"}  # a misspelt key in a build config is an error, not ignored
    backend: Literal["rembg", "classic"] = "rembg"
    # A rembg model name, or the path of a local .onnx file (loaded as rembg's u2net_custom).
    rembg_model: str = "u2net"
    # classic backend: Lab distance from the backdrop colour at which a pixel becomes product.
    classic_threshold: float = Field(20.0, gt=0)
    size: int = Field(512, ge=16)
    # Room around the product's bounding box, as a fraction of the box's longer side, per side.
    margin: float = Field(0.04, ge=0.0, le=0.5)
    min_images: int = Field(3, ge=1)
    max_images: int = Field(5, ge=1)
    # Foreground share of the photo: below, the backend found (almost) nothing; above, it took
    # the whole frame for the product. Either way the cut-out would be wrong.
    min_foreground_fraction: float = Field(0.01, ge=0.0, le=1.0)
    max_foreground_fraction: float = Field(0.95, ge=0.0, le=1.0)
    max_pixels: int = Field(MAX_PIXELS, gt=0)  # decompression-bomb guard

    @model_validator(mode="after")
    def _ranges(self) -> ImageConfig:
        if self.min_images > self.max_images:
            raise ValueError(f"min_images ({self.min_images}) > max_images ({self.max_images})")
        if self.min_foreground_fraction >= self.max_foreground_fraction:
            raise ValueError("min_foreground_fraction must be below max_foreground_fraction")
        return self


@dataclass(frozen=True)
class Cutout:
    view: str
    source: dict  # the source_files row
    rgba: np.ndarray  # size x size x 4 uint8
    foreground_fraction: float  # of the source photo
    method: str  # what made the alpha: "alpha" (the photo's own), "classic", "rembg:<model>"


def process_product_images(product_id: str, images: list[dict], root: str, cfg: ImageConfig) -> StageResult:
    """Cut out the product in each photo; rows for the kept views, rejects for everything else."""
    out = DatasetRoot(Path(root))
    try:
        check_safe_name(product_id, "product_id")
    except UnsafeNameError as exc:
        return {"rows": [], "rejects": [reject_row(STAGE, product_id, "unsafe_product_id", str(exc), product_id)]}

    rejects: list[dict] = []
    failures: list[str] = []
    usable: list[Cutout] = []
    for view, image in zip(view_names(images), images):
        try:
            usable.append(_cut_out(view, image, cfg))
        except RejectError as exc:
            rejects.append(reject_row(STAGE, image["uri"], exc.code, str(exc), product_id))
            failures.append(f"{image['name']}: {exc.code}")

    ranked = sorted(usable, key=lambda c: view_rank(c.view))
    kept, surplus = ranked[: cfg.max_images], ranked[cfg.max_images :]
    for cutout in surplus:
        reason = (
            f"{len(usable)} usable photos, at most {cfg.max_images} are kept "
            f"({', '.join(c.view for c in kept)}); view {cutout.view!r} ranks lower"
        )
        rejects.append(reject_row(STAGE, cutout.source["uri"], "image_surplus", reason, product_id))

    product_dir = f"product_images/{product_id}"
    if len(kept) < cfg.min_images:
        why = f"; the others: {'; '.join(failures)}" if failures else ""
        reason = f"{len(usable)} usable photo(s) of {len(images)}, at least {cfg.min_images} needed{why}"
        rejects.append(reject_row(STAGE, product_id, "too_few_images", reason, product_id))
        # Views an earlier run wrote for this product no longer belong to the dataset.
        shutil.rmtree(out.path(product_dir), ignore_errors=True)
        return {"rows": [], "rejects": rejects}

    rows = []
    with out.atomic_dir(product_dir) as tmp:
        for cutout in kept:
            file = tmp / f"{cutout.view}.png"
            save_png(file, cutout.rgba, compress_level=6)  # kept for good: worth compressing
            rows.append(
                {
                    "product_id": product_id,
                    "view": cutout.view,
                    "image_path": DatasetRoot.product_image_rel(product_id, cutout.view),
                    "source_name": cutout.source["name"],
                    "source_sha256": cutout.source["sha256"],
                    "background_removal": cutout.method,
                    "foreground_fraction": cutout.foreground_fraction,
                    "sha256": sha256_file(file)[0],
                }
            )
    return {"rows": rows, "rejects": rejects}


def view_names(images: list[dict]) -> list[str]:
    """One file-safe, unique view name per photo: its file stem, else `view{i}`; repeats get
    `-2`, `-3`... (compared case-insensitively, for case-insensitive file systems)."""
    names: list[str] = []
    taken: set[str] = set()
    for i, image in enumerate(images):
        stem = Path(image["name"]).stem
        try:
            base = check_safe_name(stem, "view")
        except UnsafeNameError:
            base = f"view{i}"
        view, n = base, 2
        while view.lower() in taken:
            view, n = f"{base}-{n}", n + 1
        taken.add(view.lower())
        names.append(view)
    return names


def view_rank(view: str) -> tuple[int, str]:
    """Sort key: preferred views first ("side_left" counts as side, "backpack" does not as back)."""
    lowered = view.lower()
    for rank, word in enumerate(PREFERRED_VIEWS):
        if re.match(rf"{word}(?![a-z])", lowered):
            return rank, lowered
    return len(PREFERRED_VIEWS), lowered


def _cut_out(view: str, image: dict, cfg: ImageConfig) -> Cutout:
    rgb, alpha = load_photo(image["uri"], max_pixels=cfg.max_pixels)
    if alpha is not None:
        matte, method = alpha.astype(np.float32) / 255.0, "alpha"
    else:
        matte = remove_background(rgb, cfg.backend, cfg.rembg_model, cfg.classic_threshold)
        method = _backend_label(cfg)
    foreground = matte > 0.5
    fraction = float(foreground.mean())
    if fraction < cfg.min_foreground_fraction:
        raise RejectError(
            "foreground_too_small",
            f"{method} found product in {fraction:.1%} of the photo (< {cfg.min_foreground_fraction:.1%}): "
            "no product, or the background was not separated",
        )
    if fraction > cfg.max_foreground_fraction:
        raise RejectError(
            "foreground_too_large",
            f"{method} took {fraction:.1%} of the photo for the product (> {cfg.max_foreground_fraction:.1%}): "
            "the background was not separated",
        )
    return Cutout(view, image, square_cutout(rgb, matte, foreground, cfg.size, cfg.margin), fraction, method)


def _backend_label(cfg: ImageConfig) -> str:
    """ "classic", or "rembg:<model>" with a model file named without its folder."""
    if cfg.backend != "rembg":
        return cfg.backend
    return f"rembg:{Path(cfg.rembg_model).name if is_model_file(cfg.rembg_model) else cfg.rembg_model}"


def square_cutout(rgb: np.ndarray, matte: np.ndarray, foreground: np.ndarray, size: int, margin: float) -> np.ndarray:
    """Crop to the foreground's box (+ margin), fit into size x size keeping the aspect ratio,
    centre on a transparent canvas -> RGBA uint8."""
    ys, xs = np.nonzero(foreground)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    pad = round(margin * max(y1 - y0, x1 - x0))
    h, w = foreground.shape
    y0, x0, y1, x1 = max(0, y0 - pad), max(0, x0 - pad), min(h, y1 + pad), min(w, x1 + pad)
    alpha = matte[y0:y1, x0:x1]
    # Resize premultiplied colour: otherwise the backdrop's colour bleeds into the product's edge.
    premultiplied = rgb[y0:y1, x0:x1].astype(np.float32) * alpha[..., None]

    scale = size / max(y1 - y0, x1 - x0)
    new_w, new_h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    premultiplied = cv2.resize(premultiplied, (new_w, new_h), interpolation=interpolation)
    alpha = np.clip(cv2.resize(alpha, (new_w, new_h), interpolation=interpolation), 0.0, 1.0)
    colour = np.where(alpha[..., None] > 0, premultiplied / np.maximum(alpha, 1e-6)[..., None], 0.0)

    canvas = np.zeros((size, size, 4), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w, :3] = np.clip(colour + 0.5, 0, 255).astype(np.uint8)
    canvas[top : top + new_h, left : left + new_w, 3] = np.round(alpha * 255).astype(np.uint8)
    return canvas


product_images_task = stage_task("product_images", "1")(process_product_images)
