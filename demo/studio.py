"""Synthetic product studio: a SOURCE tree shaped like crawled product pages, with its ground truth.

```
SOURCE/                                   what the pipeline reads
  products.csv                            product_id,category,caption,prompt
  <product_id>/videos/<name>.mp4          1-3 showcase videos, 2-4 shots each, hard cuts
  <product_id>/images/<view>.jpg|png      3-5 studio photos (front, side, back, detail, top)
  <product_id>/meta.json                  {"category", "caption", "prompt"}
TRUTH/                                    what only tests and benchmarks may read
  cuts.json                               per video: fps, num_frames, width, height, cuts, shots
  masks/<product_id>/<video stem>/{frame:05d}.png   true product mask per source frame (0/255)
  products.json                           per product: kind, colours, texture, shape, views
```

A product is a 2D shape drawn with OpenCV (ring, bracelet, bottle, box, shoe, watch, mug), with a
texture (stripes, dots, gradient, noise) and bevel shading from a light direction, so it looks
3D-ish and its look changes with the light and the camera. Each shot renders the product sprite
once and moves it per frame with one `cv2.warpAffine` (orbit = rotation + foreshortening, pan,
zoom) over a light studio backdrop (gradient, vignette, faint texture, grain). Everything comes
from `StudioConfig.seed`: the same seed gives byte-identical masks and the same cuts.

Two looks (`StudioConfig.look`):
- classic: every product its own random shape, colours and fine texture (stripes of a few px);
- colourway: a product is (shape + camera plan, colourway). `colourways` products share a kind,
  shape parameters and videos (same shots, backdrop and grain); each has its own saturated
  colours, broad bands or a large decal (16+ px at 128 x 192: the latent cell is 8 px) and its
  own photos. A product's colours can then only be learnt from its photos, never from its shape.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, Field, model_validator

from storage.images import save_png
from storage.video import EncodeSettings, VideoWriter

# Kind (= category) -> product id prefix.
KIND_PREFIX = {
    "ring": "RING",
    "bracelet": "BRCL",
    "bottle": "BOTL",
    "box": "BOX",
    "shoe": "SHOE",
    "watch": "WTCH",
    "mug": "MUG",
}
VIEWS = ("front", "side", "back", "detail", "top")
TEXTURES = ("stripes", "dots", "gradient", "noise")
# Colourway look: identity at a scale the latent grid carries (unit-square fractions of the product).
COLOURWAY_TEXTURES = ("bands", "decal")
_BAND_PERIOD = (0.6, 0.9)  # a band is a third of a period: 16+ px on a product of ~80 px
_DECAL_RADIUS = (0.16, 0.22)
MOVES = ("orbit", "pan", "zoom")

# Part labels in a drawn product: which colour a part takes and how bright it is.
BODY, BODY_LIGHT, BODY_DARK, ACCENT, DARK = 1, 2, 3, 4, 5
_PART_BRIGHTNESS = {BODY: 1.0, BODY_LIGHT: 1.18, BODY_DARK: 0.72, ACCENT: 1.0, DARK: 1.0}
_PART_SPECULAR = {BODY: 0.25, BODY_LIGHT: 0.25, BODY_DARK: 0.15, ACCENT: 0.55, DARK: 0.35}
_DARK_RGB = (30, 30, 38)
_ACCENTS = {"gold": (196, 150, 48), "gunmetal": (96, 102, 114), "rose gold": (183, 104, 88), "black": (38, 38, 44)}

# Light, low-saturation studio tones. Consecutive shots take tones at least this far apart
# (mean absolute RGB difference), so every hard cut is a clear jump in the whole frame.
_BACKDROP_TONES = (
    (238, 238, 235),
    (214, 214, 212),
    (234, 221, 200),
    (203, 215, 231),
    (233, 211, 216),
    (210, 227, 210),
    (188, 190, 195),
)
_PHOTO_TONES = ((245, 245, 243), (240, 237, 232), (236, 239, 243))
_MIN_CUT_TONE_STEP = 15.0
_GRAIN_FRAMES = 4  # grain patterns cycled through a shot: live-looking noise at a fraction of the cost


class StudioConfig(BaseModel):
    """Sizes and counts of a synthetic studio; ranges are inclusive (lo, hi)."""

    num_products: int = Field(20, ge=1)
    seed: int = 0
    width: int = Field(1280, ge=32, description="landscape video width; portrait videos swap width and height")
    height: int = Field(720, ge=32)
    fps: float = Field(24.0, gt=0)
    videos_per_product: tuple[int, int] = (1, 3)
    shots_per_video: tuple[int, int] = (2, 4)
    shot_seconds: tuple[float, float] = (3.5, 9.0)
    images_per_product: tuple[int, int] = (3, 5)
    portrait_fraction: float = Field(0.15, ge=0, le=1, description="chance that a video is portrait (H > W)")
    image_size: int = Field(1024, ge=32, description="side of the square product photos")
    kinds: tuple[str, ...] = tuple(KIND_PREFIX)
    crf: int = Field(18, ge=0, le=51)
    # ultrafast: about 2x the speed of veryfast here, files about 10% larger at the same crf
    preset: str = Field("ultrafast", description="x264 preset of the showcase videos")
    grain_sigma: float = Field(1.0, ge=0, description="std of the per-frame backdrop noise, in 8-bit levels")
    look: Literal["classic", "colourway"] = Field("classic", description="see the module docstring")
    colourways: int = Field(4, ge=1, description="colourway look: products that share one shape and its videos")

    @model_validator(mode="after")
    def _check(self) -> StudioConfig:
        for name in ("videos_per_product", "shots_per_video", "shot_seconds", "images_per_product"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < lo <= hi, got {(lo, hi)}")
        if self.images_per_product[1] > len(VIEWS):
            raise ValueError(f"images_per_product allows at most {len(VIEWS)} views ({', '.join(VIEWS)})")
        if self.width % 2 or self.height % 2:
            raise ValueError("width and height must be even (H.264 yuv420p)")
        unknown = set(self.kinds) - set(KIND_PREFIX)
        if unknown or not self.kinds:
            raise ValueError(
                f"kinds must be a non-empty subset of {sorted(KIND_PREFIX)}, got unknown {sorted(unknown)}"
            )
        return self

    @classmethod
    def tiny(cls, **overrides) -> StudioConfig:
        """Small sizes for tests: 256x144 videos of 2-3 shots of 1-2 s, 160 px photos."""
        values = dict(
            num_products=3,
            width=256,
            height=144,
            videos_per_product=(1, 2),
            shots_per_video=(2, 3),
            shot_seconds=(1.0, 2.0),
            image_size=160,
        )
        return cls(**(values | overrides))


@dataclass(frozen=True)
class ProductSpec:
    """Everything that defines how one product looks."""

    product_id: str
    kind: str
    primary: tuple[int, int, int]
    secondary: tuple[int, int, int]
    accent_name: str
    texture: str
    texture_angle: float  # degrees, for stripes and gradient
    texture_period: float  # fraction of the product size, for stripes and dots
    texture_seed: int  # for the noise texture
    shape: dict[str, float] = field(default_factory=dict)
    accent_rgb: tuple[int, int, int] | None = None  # colourway look: a colour of its own, not a metal
    texture_centre: tuple[float, float] = (0.5, 0.5)  # of the decal, in the unit square

    @property
    def accent(self) -> tuple[int, int, int]:
        return self.accent_rgb or _ACCENTS[self.accent_name]

    @property
    def caption(self) -> str:
        primary, secondary = colour_name(self.primary), colour_name(self.secondary)
        pattern = {
            "stripes": f"with {secondary} stripes",
            "dots": f"with {secondary} dots",
            "gradient": f"fading into {secondary}",
            "noise": f"with a mottled {secondary} pattern",
            "bands": f"with broad {secondary} bands",
            "decal": f"with a large {secondary} decal",
        }[self.texture]
        article = "an" if primary[0] in "aeiou" else "a"
        return f"{article} {primary} {self.kind} {pattern} and {self.accent_name} details"

    def meta(self) -> dict:
        return {"category": self.kind, "caption": self.caption, "prompt": self.kind}


def colour_name(rgb: tuple[int, int, int]) -> str:
    """A plain English colour word for captions."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    if v < 0.22:
        return "black"
    if s < 0.2:
        return "grey" if v < 0.8 else "white"
    hue = h * 360
    if 15 <= hue < 45 and v < 0.6:
        return "brown"
    for limit, name in (
        (15, "red"),
        (45, "orange"),
        (70, "yellow"),
        (160, "green"),
        (195, "teal"),
        (255, "blue"),
        (290, "purple"),
        (340, "pink"),
    ):
        if hue < limit:
            return name
    return "red"


def _product_colour(rng: np.random.Generator, hue: float) -> tuple[int, int, int]:
    # Saturated or dark enough to stand apart from every light, low-saturation backdrop tone.
    s, v = rng.uniform(0.55, 0.95), rng.uniform(0.35, 0.8)
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue % 1.0, s, v))


def _random_shape(rng: np.random.Generator, kind: str) -> dict[str, float]:
    ranges = {
        "ring": {"thickness": (0.05, 0.1)},
        "bracelet": {"aspect": (0.55, 0.8), "thickness": (0.05, 0.08), "beads": (7, 13)},
        "bottle": {"half_width": (0.14, 0.2), "shoulder": (0.36, 0.44)},
        "box": {"depth": (0.12, 0.2), "height": (0.6, 1.0)},
        "shoe": {"boot": (0.0, 0.2)},
        "watch": {"strap": (0.1, 0.14), "hour": (0.0, 12.0)},
        "mug": {"half_width": (0.24, 0.3), "top": (0.18, 0.3)},
    }[kind]
    return {name: round(float(rng.uniform(lo, hi)), 4) for name, (lo, hi) in ranges.items()}


def random_product(rng: np.random.Generator, kind: str, product_id: str) -> ProductSpec:
    hue = rng.uniform()
    return ProductSpec(
        product_id=product_id,
        kind=kind,
        primary=_product_colour(rng, hue),
        secondary=_product_colour(rng, hue + rng.uniform(0.2, 0.5)),
        accent_name=str(rng.choice(sorted(_ACCENTS))),
        texture=str(rng.choice(TEXTURES)),
        texture_angle=float(rng.uniform(0, 180)),
        texture_period=float(rng.uniform(0.08, 0.16)),
        texture_seed=int(rng.integers(2**31)),
        shape=_random_shape(rng, kind),
    )


# Colourways of one shape: primaries at least this far apart (RGB distance), so they clearly differ.
_MIN_SIBLING_DISTANCE = 90.0
# Colourway colours: a bright saturated body, far from every light low-saturation backdrop tone and
# spread over the colour space, and a darker neighbouring shade for bands, decal and accents. Two
# unrelated colours in equal parts would average to the dataset's grey: a product's mean colour
# must stay far from the dataset's mean (issue 14's gate 1: photo colour beats no photo by 6 dB).
_PRIMARY_VALUE = (0.8, 1.0)
_SECONDARY_VALUE = (0.55, 0.7)
_SECONDARY_HUE_STEP = 0.05


def _vivid_colour(rng: np.random.Generator, hue: float, value: tuple[float, float]) -> tuple[int, int, int]:
    s, v = rng.uniform(0.85, 1.0), rng.uniform(*value)
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue % 1.0, s, v))


def _decal_centre(rng: np.random.Generator, kind: str, shape: dict[str, float]) -> tuple[float, float]:
    """A random point deep inside the product's body (unit square), where a decal shows."""
    n = 64
    labels = np.zeros((n, n), np.uint8)
    _draw_parts(kind, shape, n, 0, labels)
    body = np.isin(labels, (BODY, BODY_LIGHT, BODY_DARK)).astype(np.uint8)
    depth = cv2.distanceTransform(body, cv2.DIST_L2, 5)
    ys, xs = np.nonzero(depth >= 0.5 * depth.max())
    pick = int(rng.integers(len(xs)))
    return (float(xs[pick]) + 0.5) / n, (float(ys[pick]) + 0.5) / n


def random_colourway(
    rng: np.random.Generator, kind: str, shape: dict[str, float], product_id: str, siblings: list[ProductSpec]
) -> ProductSpec:
    """One colourway of a shape: body and second colour, bands or a decal, a coloured accent."""
    for _ in range(1000):
        hue = rng.uniform()
        primary = _vivid_colour(rng, hue, _PRIMARY_VALUE)
        if all(math.dist(primary, other.primary) >= _MIN_SIBLING_DISTANCE for other in siblings):
            break
    else:
        raise RuntimeError(f"no colourway of {product_id} stands apart from its {len(siblings)} siblings")
    secondary = _vivid_colour(rng, hue + rng.uniform(-_SECONDARY_HUE_STEP, _SECONDARY_HUE_STEP), _SECONDARY_VALUE)
    texture = str(rng.choice(COLOURWAY_TEXTURES))
    size = rng.uniform(*(_BAND_PERIOD if texture == "bands" else _DECAL_RADIUS))
    return ProductSpec(
        product_id=product_id,
        kind=kind,
        primary=primary,
        secondary=secondary,
        accent_name=colour_name(secondary),
        texture=texture,
        texture_angle=float(rng.uniform(0, 180)),
        texture_period=float(size),
        texture_seed=0,
        shape=shape,
        accent_rgb=secondary,
        texture_centre=_decal_centre(rng, kind, shape),
    )


@dataclass(frozen=True)
class Colourway:
    """A product of the colourway look, with the random streams its files are drawn from."""

    spec: ProductSpec
    seed: int
    shape_index: int
    colourway: int

    def scene_rng(self) -> np.random.Generator:
        """The same stream for every colourway of a shape: the same videos, only the colours differ."""
        return np.random.default_rng([self.seed, self.shape_index + 1, 0])

    def photo_rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.shape_index + 1, self.colourway + 1, 0])


def colourway_shape(cfg: StudioConfig, shape_index: int) -> list[Colourway]:
    """The `cfg.colourways` products of one shape; kinds cycle over shapes in a seeded order."""
    kind = _kind_order(cfg)[shape_index % len(cfg.kinds)]
    shape = _random_shape(np.random.default_rng([cfg.seed, shape_index + 1]), kind)
    specs: list[ProductSpec] = []
    for c in range(cfg.colourways):
        rng = np.random.default_rng([cfg.seed, shape_index + 1, c + 1])
        specs.append(random_colourway(rng, kind, shape, f"{KIND_PREFIX[kind]}{shape_index + 1:04d}C{c + 1}", specs))
    return [Colourway(spec, cfg.seed, shape_index, c) for c, spec in enumerate(specs)]


# ---------------------------------------------------------------------------------------------
# Drawing a product
# ---------------------------------------------------------------------------------------------


def _draw_parts(kind: str, shape: dict[str, float], n: int, off: int, canvas: np.ndarray) -> None:
    """Draw the part labels of a product whose unit square [0, 1]^2 maps to n px at offset `off`."""

    def p(x: float, y: float) -> tuple[int, int]:
        return int(round(off + x * n)), int(round(off + y * n))

    def ln(v: float) -> int:
        return max(1, int(round(v * n)))

    def rect(x0, y0, x1, y1, label):
        cv2.rectangle(canvas, p(x0, y0), p(x1, y1), label, -1)

    def rounded_rect(x0, y0, x1, y1, r, label):
        rect(x0 + r, y0, x1 - r, y1, label)
        rect(x0, y0 + r, x1, y1 - r, label)
        for cx, cy in ((x0 + r, y0 + r), (x1 - r, y0 + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
            cv2.circle(canvas, p(cx, cy), ln(r), label, -1, cv2.LINE_8)

    def poly(points, label):
        cv2.fillPoly(canvas, [np.array([p(x, y) for x, y in points], np.int32)], label)

    if kind == "ring":
        r_out, cy = 0.36, 0.58
        cv2.circle(canvas, p(0.5, cy), ln(r_out), BODY, -1)
        cv2.circle(canvas, p(0.5, cy), ln(r_out - shape["thickness"]), 0, -1)
        cv2.circle(canvas, p(0.5, cy - r_out), ln(0.1), ACCENT, -1)  # setting
        cv2.circle(canvas, p(0.5, cy - r_out), ln(0.065), BODY_LIGHT, -1)  # stone
    elif kind == "bracelet":
        a, t = 0.37, shape["thickness"]
        b = a * shape["aspect"]
        cv2.ellipse(canvas, p(0.5, 0.5), (ln(a), ln(b)), 0, 0, 360, BODY, ln(t))
        beads = int(shape["beads"])
        for j in range(beads):
            theta = 2 * math.pi * j / beads
            cv2.circle(canvas, p(0.5 + a * math.cos(theta), 0.5 + b * math.sin(theta)), ln(0.75 * t), ACCENT, -1)
    elif kind == "bottle":
        hw, sy = shape["half_width"], shape["shoulder"]
        rounded_rect(0.5 - hw, sy, 0.5 + hw, 0.93, 0.05, BODY)
        cv2.ellipse(canvas, p(0.5, sy), (ln(hw), ln(0.12)), 0, 180, 360, BODY, -1)
        rect(0.445, 0.18, 0.555, sy, BODY)  # neck
        rect(0.5 - hw, 0.58, 0.5 + hw, 0.78, BODY_LIGHT)  # label
        rounded_rect(0.43, 0.06, 0.57, 0.2, 0.02, ACCENT)  # cap
    elif kind == "box":
        d = shape["depth"]
        x0, x1, y1 = 0.06, 0.94 - d, 0.94
        y0 = 0.06 + d + (1 - shape["height"]) * 0.3
        xm, w = (x0 + x1) / 2, 0.035
        rect(x0, y0, x1, y1, BODY)
        poly([(x0, y0), (x1, y0), (x1 + d, y0 - d), (x0 + d, y0 - d)], BODY_LIGHT)  # top face
        poly([(x1, y0), (x1 + d, y0 - d), (x1 + d, y1 - d), (x1, y1)], BODY_DARK)  # side face
        rect(xm - w, y0, xm + w, y1, ACCENT)  # ribbon
        poly([(xm - w, y0), (xm + w, y0), (xm + w + d, y0 - d), (xm - w + d, y0 - d)], ACCENT)
    elif kind == "shoe":
        h = shape["boot"]
        upper = [
            (0.06, 0.8),
            (0.07, 0.42 - h),
            (0.28, 0.44 - 0.8 * h),
            (0.42, 0.52),
            (0.62, 0.56),
            (0.84, 0.62),
            (0.94, 0.72),
            (0.94, 0.8),
        ]
        poly(upper, BODY)
        rounded_rect(0.05, 0.78, 0.95, 0.88, 0.04, ACCENT)  # sole
        cv2.ellipse(canvas, p(0.17, 0.43 - 0.9 * h), (ln(0.1), ln(0.025)), -4, 0, 360, DARK, -1)  # opening
        for j in range(3):  # laces
            x = 0.4 + 0.07 * j
            cv2.line(canvas, p(x, 0.5 + 0.02 * j), p(x + 0.05, 0.58 + 0.02 * j), ACCENT, ln(0.015))
    elif kind == "watch":
        sw = shape["strap"]
        rounded_rect(0.5 - sw, 0.05, 0.5 + sw, 0.95, 0.04, BODY)
        cv2.circle(canvas, p(0.5, 0.5), ln(0.28), ACCENT, -1)  # case
        rect(0.76, 0.47, 0.81, 0.53, ACCENT)  # crown
        cv2.circle(canvas, p(0.5, 0.5), ln(0.22), DARK, -1)  # dial
        for j in range(12):
            theta = 2 * math.pi * j / 12
            cv2.circle(canvas, p(0.5 + 0.18 * math.cos(theta), 0.5 + 0.18 * math.sin(theta)), ln(0.012), ACCENT, -1)
        hour = shape["hour"] * 2 * math.pi / 12 - math.pi / 2
        minute = (shape["hour"] % 1) * 2 * math.pi - math.pi / 2
        cv2.line(canvas, p(0.5, 0.5), p(0.5 + 0.11 * math.cos(hour), 0.5 + 0.11 * math.sin(hour)), ACCENT, ln(0.022))
        cv2.line(
            canvas, p(0.5, 0.5), p(0.5 + 0.17 * math.cos(minute), 0.5 + 0.17 * math.sin(minute)), ACCENT, ln(0.013)
        )
    elif kind == "mug":
        hw, top = shape["half_width"], shape["top"]
        x0, x1, xc = 0.08, 0.08 + 2 * hw, 0.08 + hw
        cv2.ellipse(canvas, p(x1, 0.56), (ln(0.16), ln(0.2)), 0, -80, 80, BODY, ln(0.06))  # handle
        rounded_rect(x0, top, x1, 0.92, 0.06, BODY)
        cv2.ellipse(canvas, p(xc, top), (ln(hw), ln(0.05)), 0, 0, 360, BODY_LIGHT, -1)  # rim
        cv2.ellipse(canvas, p(xc, top), (ln(hw - 0.025), ln(0.035)), 0, 0, 360, DARK, -1)  # inside
    else:
        raise ValueError(f"unknown product kind {kind!r}")


def _texture_weight(spec: ProductSpec, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the secondary colour shows (0..1) at unit-square coordinates u, v (broadcastable)."""
    angle = math.radians(spec.texture_angle)
    along = u * math.cos(angle) + v * math.sin(angle)
    if spec.texture == "stripes":
        return np.clip(np.sin(2 * np.pi * along / spec.texture_period) * 2.5 + 0.5, 0, 1)
    if spec.texture == "bands":  # broad stripes covering a third of the body: the body colour dominates
        return np.clip((np.sin(2 * np.pi * along / spec.texture_period) - 0.5) * 10 + 0.5, 0, 1)
    if spec.texture == "decal":  # a disc, edge about 1 px wide
        cu, cv = spec.texture_centre
        return np.clip((spec.texture_period - np.hypot(u - cu, v - cv)) * 100 + 0.5, 0, 1)
    if spec.texture == "dots":
        cell = spec.texture_period
        du, dv = (u / cell) % 1.0 - 0.5, (v / cell) % 1.0 - 0.5
        return np.clip((0.3 - np.hypot(du, dv)) / 0.06 + 0.5, 0, 1)
    if spec.texture == "gradient":
        lo, hi = (
            min(0.0, math.cos(angle)) + min(0.0, math.sin(angle)),
            max(0.0, math.cos(angle)) + max(0.0, math.sin(angle)),
        )
        return np.clip((along - lo) / (hi - lo), 0, 1)
    # noise: smooth blobs, bicubic over a small random grid (fixed seed: every render agrees)
    grid = np.random.default_rng(spec.texture_seed).random((9, 9)).astype(np.float32)
    map_x, map_y = np.broadcast_arrays(u * 8, v * 8)
    blobs = cv2.remap(
        grid, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
    )
    return np.clip((blobs - 0.5) * 3 + 0.5, 0, 1)


@dataclass(frozen=True)
class Sprite:
    """A rendered product: premultiplied RGB + alpha (float32, H x W x 4), its centre and radius."""

    rgba: np.ndarray
    centre: tuple[float, float]
    radius: float  # of the circle around `centre` that holds every product pixel


def render_sprite(spec: ProductSpec, size_px: float, light_deg: float) -> Sprite:
    """Draw, texture and shade a product whose unit square spans `size_px` pixels.

    Small sprites are drawn at 2x and area-downsampled (anti-aliased edges); the result is padded
    so that any rotation fits. `light_deg` is where the light comes from in the image plane
    (0 = right, 90 = below, 225 = upper left).
    """
    supersample = 2 if size_px <= 600 else 1  # large sprites: aliasing is invisible, time is not
    n = supersample * max(8, int(round(size_px)))
    labels = np.zeros((n, n), np.uint8)
    _draw_parts(spec.kind, spec.shape, n, 0, labels)
    inside = labels > 0

    # Texture on the body parts, in unit-square coordinates (it moves with the product).
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    weight = _texture_weight(spec, coords[None, :], coords[:, None])[..., None]
    colour = np.asarray(spec.primary, np.float32) * (1 - weight) + np.asarray(spec.secondary, np.float32) * weight
    colour[labels == ACCENT] = spec.accent
    colour[labels == DARK] = _DARK_RGB
    brightness = np.ones(len(_PART_BRIGHTNESS) + 1, np.float32)
    specular_strength = np.zeros_like(brightness)
    for label in _PART_BRIGHTNESS:
        brightness[label], specular_strength[label] = _PART_BRIGHTNESS[label], _PART_SPECULAR[label]

    # Bevel shading: height rises over `bevel` px from the silhouette edge (rounded profile),
    # lit by a directional light; thin parts (ring band, strap) become tubes.
    dist = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5)
    bevel = max(2.0, min(float(dist.max()), 0.06 * n))
    d = np.minimum(dist, bevel)
    height = cv2.GaussianBlur(np.sqrt(np.maximum(bevel**2 - (bevel - d) ** 2, 0)), (0, 0), 0.75 * supersample)
    gy, gx = np.gradient(height)
    norm = np.sqrt(gx * gx + gy * gy + 1)
    elevation = math.radians(55)
    lx = -math.cos(math.radians(light_deg)) * math.cos(elevation)
    ly = -math.sin(math.radians(light_deg)) * math.cos(elevation)
    lz = math.sin(elevation)
    diffuse = np.clip((-gx * lx - gy * ly + lz) / norm, 0, 1)
    hx, hy, hz = (float(c) for c in np.array([lx, ly, lz + 1]) / math.hypot(lx, ly, lz + 1))  # Blinn half vector
    specular = np.clip((-gx * hx - gy * hy + hz) / norm, 0, 1) ** 40
    # A soft light falloff across the whole product, brighter towards the light.
    falloff = 1 + 0.1 * (-(coords[None, :] - 0.5) * lx - (coords[:, None] - 0.5) * ly) / math.cos(elevation)
    lit = colour * ((0.4 + 0.6 * diffuse) * falloff * brightness[labels])[..., None]
    lit += (specular * specular_strength[labels])[..., None] * (255 - lit)
    alpha = inside.astype(np.float32)[..., None]
    rgba = np.concatenate([np.clip(lit, 0, 255) * alpha, alpha], axis=2)
    if supersample > 1:
        rgba = cv2.resize(rgba, (n // supersample, n // supersample), interpolation=cv2.INTER_AREA)

    m = n // supersample
    pad = int(math.ceil(m * 0.23))  # the unit square's diagonal (1.41 m) fits in m + 2 pad
    rgba = cv2.copyMakeBorder(rgba, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    centre = pad + m / 2 - 0.5  # pixel-index coordinates of the unit square's centre
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    radius = float(np.sqrt((xs - centre) ** 2 + (ys - centre) ** 2).max()) + 1.5
    return Sprite(rgba=rgba, centre=(centre, centre), radius=radius)


def unit_radius(spec: ProductSpec) -> float:
    """Radius of the product's bounding circle when its unit square spans 1 px (for framing)."""
    return render_sprite(spec, 64, 225).radius / 64


def _affine(
    sprite: Sprite, cx: float, cy: float, scale: float, angle_deg: float, sx: float = 1.0, sy: float = 1.0
) -> np.ndarray:
    """2x3 matrix: sprite pixel -> frame pixel (foreshorten, scale, rotate, then place at cx, cy)."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    linear = rot @ np.diag([scale * sx, scale * sy])
    shift = np.array([cx, cy]) - linear @ np.asarray(sprite.centre)
    return np.hstack([linear, shift[:, None]])


def composite(frame: np.ndarray, sprite: Sprite, matrix: np.ndarray, extent: float) -> tuple[slice, slice, np.ndarray]:
    """Draw the warped sprite into `frame` (in place) and return (rows, cols, alpha there).

    Only the box of radius `extent` around the product's placed centre is touched (fast).
    """
    h, w = frame.shape[:2]
    cx, cy = matrix @ np.array([*sprite.centre, 1.0])
    x0, x1 = max(0, int(cx - extent) - 2), min(w, int(math.ceil(cx + extent)) + 3)
    y0, y1 = max(0, int(cy - extent) - 2), min(h, int(math.ceil(cy + extent)) + 3)
    local = matrix.copy()
    local[:, 2] -= (x0, y0)
    warped = cv2.warpAffine(
        sprite.rgba, local, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    alpha = warped[..., 3:]
    rows, cols = slice(y0, y1), slice(x0, x1)
    frame[rows, cols] = np.clip(frame[rows, cols] * (1 - alpha) + warped[..., :3] + 0.5, 0, 255).astype(np.uint8)
    return rows, cols, alpha[..., 0]


def backdrop(
    rng: np.random.Generator, height: int, width: int, tone: tuple[int, int, int], vignette: float
) -> np.ndarray:
    """A studio backdrop (float32 H x W x 3): lighter at the top, vignetted, faintly mottled."""
    ys = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    light = (1.03 - 0.04 * (ys + 1)) * (1 - vignette * (xs * xs + ys * ys) / 2)
    mottle = cv2.resize(rng.uniform(-3, 3, (4, 7)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.asarray(tone, np.float32) * light[..., None] + mottle[..., None]


# ---------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    """One camera set-up: a move between two poses over `frames` frames on one backdrop tone."""

    move: str
    frames: int
    tone: tuple[int, int, int]
    light_deg: float
    size_px: float  # unit-square size of the product at scale 1
    start: tuple[float, float, float, float, float]  # cx, cy, scale, angle, sx
    end: tuple[float, float, float, float, float]

    def pose(self, i: int) -> np.ndarray:
        t = i / max(self.frames - 1, 1)
        ease = 0.5 - 0.5 * math.cos(math.pi * t)
        return np.asarray(self.start) + (np.asarray(self.end) - np.asarray(self.start)) * ease


def _plan_shot(rng: np.random.Generator, move: str, frames: int, tone, width: int, height: int, rho: float) -> Shot:
    """Pick poses so the product (bounding radius `rho` x size) stays inside the frame margins."""
    margin = max(3.0, 0.05 * min(width, height))
    half = min(width, height) / 2 - margin
    radius = rng.uniform(0.5, 0.72) * half if move == "pan" else rng.uniform(0.6, 0.9) * half

    def place(scale: float) -> tuple[float, float]:
        reach = radius * scale + margin
        return rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)

    angle = rng.uniform(-8, 8)
    if move == "orbit":  # turn: rotate and foreshorten
        cx, cy = place(1.0)
        turn, squash = rng.choice([-1, 1]) * rng.uniform(8, 18), rng.uniform(0.7, 0.85)
        start, end = (cx, cy, 1.0, angle, 1.0), (cx, cy, 1.0, angle + turn, squash)
    elif move == "zoom":
        cx, cy = place(1.0)
        near, far = 1.0, rng.uniform(0.6, 0.75)
        drift = rng.uniform(-0.1, 0.1, 2) * radius
        reach = radius + margin
        ex, ey = np.clip(cx + drift[0], reach, width - reach), np.clip(cy + drift[1], reach, height - reach)
        poses = [(cx, cy, far, angle, 1.0), (float(ex), float(ey), near, angle + rng.uniform(-3, 3), 1.0)]
        start, end = poses if rng.uniform() < 0.5 else poses[::-1]
    elif move == "pan":  # along the long side of the frame
        reach = radius + margin
        long_side, short_side = max(width, height), min(width, height)
        lo, hi = reach, long_side - reach
        a, b = lo + rng.uniform(0, 0.25) * (hi - lo), hi - rng.uniform(0, 0.25) * (hi - lo)
        if rng.uniform() < 0.5:
            a, b = b, a
        across = rng.uniform(reach, short_side - reach)
        pairs = [(a, across), (b, across)] if width >= height else [(across, a), (across, b)]
        end_angle = angle + rng.uniform(-3, 3)
        start, end = (*pairs[0], 1.0, angle, 1.0), (*pairs[1], 1.0, end_angle, 1.0)
    else:
        raise ValueError(f"unknown camera move {move!r}")
    return Shot(
        move, frames, tone, float(rng.uniform(180, 270)), radius / rho, tuple(map(float, start)), tuple(map(float, end))
    )


def _tone_step(a, b) -> float:
    return float(np.abs(np.subtract(a, b, dtype=np.float32)).mean())


def plan_video(rng: np.random.Generator, cfg: StudioConfig, width: int, height: int, rho: float) -> list[Shot]:
    """2-4 shots: consecutive shots differ in camera move and (clearly) in backdrop tone."""
    n_shots = int(rng.integers(cfg.shots_per_video[0], cfg.shots_per_video[1] + 1))
    moves = list(rng.permutation(MOVES))
    shots, tone = [], None
    for k in range(n_shots):
        choices = [t for t in _BACKDROP_TONES if tone is None or _tone_step(t, tone) >= _MIN_CUT_TONE_STEP]
        tone = choices[int(rng.integers(len(choices)))]
        jittered = tuple(int(np.clip(c + rng.integers(-4, 5), 0, 255)) for c in tone)
        frames = max(2, int(round(rng.uniform(*cfg.shot_seconds) * cfg.fps)))
        shots.append(_plan_shot(rng, str(moves[k % len(moves)]), frames, jittered, width, height, rho))
    return shots


def render_video(
    rng: np.random.Generator, spec: ProductSpec, shots: list[Shot], width: int, height: int, grain_sigma: float
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (RGB frame, 0/255 product mask) for every frame of the planned shots."""
    grain = np.round(rng.standard_normal((_GRAIN_FRAMES, height, width, 1), dtype=np.float32) * grain_sigma)
    for shot in shots:
        sprite = render_sprite(spec, shot.size_px, shot.light_deg)
        base = backdrop(rng, height, width, shot.tone, vignette=float(rng.uniform(0.06, 0.12)))
        grainy = [np.clip(base + g + 0.5, 0, 255).astype(np.uint8) for g in grain]
        for i in range(shot.frames):
            cx, cy, scale, angle, sx = shot.pose(i)
            frame = grainy[i % _GRAIN_FRAMES].copy()
            rows, cols, alpha = composite(
                frame, sprite, _affine(sprite, cx, cy, scale, angle, sx), sprite.radius * scale
            )
            mask = np.zeros((height, width), np.uint8)
            mask[rows, cols] = np.where(alpha >= 0.5, 255, 0)
            yield frame, mask


def write_showcase_video(
    rng: np.random.Generator,
    spec: ProductSpec,
    cfg: StudioConfig,
    path: Path,
    width: int,
    height: int,
    mask_dir: Path | None = None,
) -> dict:
    """Render and encode one video (and its masks when `mask_dir` is given); returns its truth."""
    shots = plan_video(rng, cfg, width, height, unit_radius(spec))
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask_dir is not None:
        mask_dir.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, cfg.fps, height, width, EncodeSettings(crf=cfg.crf, preset=cfg.preset)) as writer:
        for i, (frame, mask) in enumerate(render_video(rng, spec, shots, width, height, cfg.grain_sigma)):
            writer.write(frame)
            if mask_dir is not None:
                save_png(mask_dir / f"{i:05d}.png", mask)
        num_frames = writer.frames
    starts = np.cumsum([0] + [s.frames for s in shots])[:-1].tolist()
    return {
        "fps": cfg.fps,
        "num_frames": num_frames,
        "width": width,
        "height": height,
        "cuts": starts[1:],
        "shots": [
            {"start": int(s0), "frames": s.frames, "move": s.move, "backdrop": "#%02x%02x%02x" % s.tone}
            for s0, s in zip(starts, shots, strict=True)
        ],
    }


# ---------------------------------------------------------------------------------------------
# Photos
# ---------------------------------------------------------------------------------------------


def render_photo(rng: np.random.Generator, spec: ProductSpec, view: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A square studio photo of one view: (RGB uint8, product alpha float32 in 0..1)."""
    tone = _PHOTO_TONES[int(rng.integers(len(_PHOTO_TONES)))]
    photo = np.clip(
        backdrop(rng, size, size, tone, vignette=float(rng.uniform(0.03, 0.07)))
        + rng.normal(0, 1.0, (size, size, 1))
        + 0.5,
        0,
        255,
    ).astype(np.uint8)
    radius = rng.uniform(0.72, 0.84) * size / 2
    # view -> (light from, scale, rotation, x foreshortening, y foreshortening / mirror)
    light, scale, angle, sx, sy = {
        "front": (225, 1.0, 0.0, 1.0, 1.0),
        "side": (200, 1.0, rng.uniform(-6, 6), 0.6, 1.0),
        "back": (315, 1.0, 0.0, -1.0, 1.0),  # mirrored, lit from the other side
        "detail": (235, 1.8, rng.uniform(-10, 10), 1.0, 1.0),
        "top": (270, 1.0, rng.uniform(-10, 10), 1.0, 0.62),
    }[view]
    sprite = render_sprite(spec, radius * scale / unit_radius(spec), light)
    cx, cy = size / 2, size / 2
    if view == "detail":  # close-up on one region of the product: it may leave the frame
        cx, cy = cx + rng.uniform(-0.3, 0.3) * radius, cy + rng.uniform(-0.3, 0.3) * radius
    matrix = _affine(sprite, cx, cy, 1.0, angle, sx, sy)
    rows, cols, alpha = composite(photo, sprite, matrix, sprite.radius)
    full_alpha = np.zeros((size, size), np.float32)
    full_alpha[rows, cols] = alpha
    return photo, full_alpha


def save_photo(path: Path, rgb: np.ndarray) -> None:
    if path.suffix == ".jpg":
        Image.fromarray(rgb).save(path, format="JPEG", quality=92)
    else:
        save_png(path, rgb, compress_level=6)


def write_photos(
    rng: np.random.Generator, spec: ProductSpec, images_dir: Path, views: list[str], size: int, ext: str
) -> list[str]:
    images_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for view in views:
        photo, _ = render_photo(rng, spec, view, size)
        save_photo(images_dir / f"{view}.{ext}", photo)
        names.append(f"{view}.{ext}")
    return names


# ---------------------------------------------------------------------------------------------
# The studio
# ---------------------------------------------------------------------------------------------


def write_product(
    rng: np.random.Generator,
    spec: ProductSpec,
    cfg: StudioConfig,
    source: Path,
    truth: Path | None,
    photo_rng: np.random.Generator | None = None,
) -> dict:
    """Write one product's folder (videos, photos, meta.json); truth (cuts, masks) when given.

    Videos come from `rng`, photos from `photo_rng` (by default `rng`, after the videos).

    Returns {"videos": {relative name: cut truth}, "images": [file names]}.
    """
    folder = source / spec.product_id
    n_videos = int(rng.integers(cfg.videos_per_product[0], cfg.videos_per_product[1] + 1))
    videos = {}
    for k in range(n_videos):
        portrait = rng.uniform() < cfg.portrait_fraction
        width, height = (cfg.height, cfg.width) if portrait else (cfg.width, cfg.height)
        name = f"showcase_{k + 1}.mp4"
        mask_dir = truth / "masks" / spec.product_id / Path(name).stem if truth is not None else None
        videos[f"{spec.product_id}/videos/{name}"] = write_showcase_video(
            rng, spec, cfg, folder / "videos" / name, width, height, mask_dir
        )
    rng = rng if photo_rng is None else photo_rng
    n_images = int(rng.integers(cfg.images_per_product[0], cfg.images_per_product[1] + 1))
    views = ["front"] + sorted(rng.choice(VIEWS[1:], n_images - 1, replace=False).tolist(), key=VIEWS.index)
    ext = "jpg" if rng.uniform() < 0.6 else "png"
    images = write_photos(rng, spec, folder / "images", views, cfg.image_size, ext)
    (folder / "meta.json").write_text(json.dumps(spec.meta(), indent=2) + "\n")
    return {"videos": videos, "images": images}


def _kind_order(cfg: StudioConfig) -> list[str]:
    order = np.random.default_rng([cfg.seed, 0]).permutation(len(cfg.kinds))
    return [cfg.kinds[j] for j in order]


def product_ids(cfg: StudioConfig) -> list[tuple[str, str]]:
    """(product_id, kind) of every classic product: kinds cycle in a seeded order, so all appear."""
    kinds = _kind_order(cfg)
    return [
        (f"{KIND_PREFIX[kinds[i % len(kinds)]]}{i + 1:04d}", kinds[i % len(kinds)]) for i in range(cfg.num_products)
    ]


def colourway_products(cfg: StudioConfig) -> list[Colourway]:
    """The first `cfg.num_products` products of the colourway look, shape by shape."""
    shapes = -(-cfg.num_products // cfg.colourways)
    return [product for index in range(shapes) for product in colourway_shape(cfg, index)][: cfg.num_products]


def studio_products(cfg: StudioConfig) -> Iterator[tuple[ProductSpec, np.random.Generator, np.random.Generator]]:
    """(spec, video stream, photo stream) of every product of the configured look."""
    if cfg.look == "colourway":
        for product in colourway_products(cfg):
            yield product.spec, product.scene_rng(), product.photo_rng()
        return
    for index, (product_id, kind) in enumerate(product_ids(cfg)):
        rng = np.random.default_rng([cfg.seed, index + 1])  # per product: ids stay stable as N grows
        yield random_product(rng, kind, product_id), rng, rng


def _require_empty(path: Path, what: str) -> None:
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{what} directory {str(path)!r} is not empty: choose an empty or new directory")
    path.mkdir(parents=True, exist_ok=True)


def generate_studio(source: Path, truth: Path, cfg: StudioConfig) -> dict:
    """Write a SOURCE tree and its TRUTH (both must be new or empty); returns a summary."""
    source, truth = Path(source), Path(truth)
    if truth.resolve().is_relative_to(source.resolve()) or source.resolve().is_relative_to(truth.resolve()):
        raise ValueError(f"truth {str(truth)!r} and source {str(source)!r} must not contain each other")
    _require_empty(source, "source")
    _require_empty(truth, "truth")
    cuts, products, rows = {}, {}, []
    for spec, rng, photo_rng in studio_products(cfg):
        product_id, kind = spec.product_id, spec.kind
        written = write_product(rng, spec, cfg, source, truth, photo_rng)
        cuts.update(written["videos"])
        meta = spec.meta()
        rows.append({"product_id": product_id, **meta})
        products[product_id] = {
            **meta,
            "kind": kind,
            "colors": {
                "primary": "#%02x%02x%02x" % spec.primary,
                "secondary": "#%02x%02x%02x" % spec.secondary,
                "accent": spec.accent_name,
            },
            "texture": spec.texture,
            "shape": spec.shape,
            "videos": sorted(written["videos"]),
            "images": written["images"],
        }
    with open(source / "products.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["product_id", "category", "caption", "prompt"])
        writer.writeheader()
        writer.writerows(rows)
    (truth / "cuts.json").write_text(json.dumps(cuts, indent=1) + "\n")
    (truth / "products.json").write_text(json.dumps(products, indent=1) + "\n")
    return {
        "products": len(products),
        "videos": len(cuts),
        "portrait_videos": sum(v["height"] > v["width"] for v in cuts.values()),
        "images": sum(len(p["images"]) for p in products.values()),
        "frames": sum(v["num_frames"] for v in cuts.values()),
        "video_seconds": round(sum(v["num_frames"] / v["fps"] for v in cuts.values()), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic product studio (SOURCE tree + ground truth).")
    parser.add_argument("--source", type=Path, required=True, help="SOURCE tree to create (new or empty)")
    parser.add_argument(
        "--truth", type=Path, required=True, help="ground-truth directory (new or empty), outside SOURCE"
    )
    parser.add_argument("--products", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--portrait-fraction", type=float, default=None, help="chance that a video is portrait")
    parser.add_argument("--tiny", action="store_true", help="small sizes for tests (256x144, 1-2 s shots)")
    parser.add_argument("--look", choices=("classic", "colourway"), default="classic")
    args = parser.parse_args(argv)
    overrides = {"num_products": args.products, "seed": args.seed, "look": args.look}
    if args.portrait_fraction is not None:
        overrides["portrait_fraction"] = args.portrait_fraction
    cfg = StudioConfig.tiny(**overrides) if args.tiny else StudioConfig(**overrides)
    print(json.dumps(generate_studio(args.source, args.truth, cfg)))


if __name__ == "__main__":
    main()
