"""Weights-free product segmentation for clean studio backdrops.

A studio backdrop is smooth: a colour with a gentle lighting gradient, plus sensor/compression
noise. Per frame, a low-order polynomial in (x, y) is fitted to the backdrop's Lab colour on a
band along the frame border (robustly: pixels of a product touching the border are dropped as
outliers), and every pixel whose colour is far from the fitted backdrop, relative to the noise
measured on the border, is foreground. Morphology removes speckle; the connected components
large enough to be an object are counted.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
from pydantic import BaseModel, Field

from models.segmenters.base import SegmentationOutput, connected_components

# Robust refits of the backdrop model; each drops border pixels that do not look like backdrop.
_FIT_ITERATIONS = 3
# Border pixels farther than this many noise scales from the fit are outliers (product, text).
_OUTLIER_SCALES = 3.0


class ClassicSettings(BaseModel):
    classic_border_px: int = Field(12, ge=1, description="width of the frame-border band that models the backdrop")
    classic_degree: int = Field(2, ge=0, le=3, description="degree of the backdrop's polynomial colour gradient")
    classic_threshold_k: float = Field(4.0, gt=0, description="foreground: Lab distance > k x backdrop noise")
    classic_min_delta_e: float = Field(8.0, ge=0, description="foreground threshold floor, in Lab units (Delta E 76)")
    classic_min_object_fraction: float = Field(
        0.003, gt=0, lt=1, description="a connected component counts as an object from this fraction of the frame"
    )


def _monomials(degree: int) -> list[tuple[int, int]]:
    """Exponents (i, j) of the terms x^i y^j of a polynomial of total degree <= `degree`."""
    return [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]


@functools.lru_cache(maxsize=8)
def _border_samples(h: int, w: int, border_px: int, degree: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, polynomial basis) of the border band's sample pixels; the same for every frame
    of a size, so computed once per size."""
    xs, ys = np.linspace(-1, 1, w), np.linspace(-1, 1, h)
    band = np.zeros((h, w), bool)
    b = min(border_px, h // 4, w // 4)
    band[:b], band[-b:], band[:, :b], band[:, -b:] = True, True, True, True
    band[1::2], band[:, 1::2] = False, False  # every other pixel: as good a fit, a quarter of the work
    rows, cols = np.nonzero(band)
    basis = np.stack([xs[cols] ** i * ys[rows] ** j for i, j in _monomials(degree)], axis=1)
    for array in (rows, cols, basis):
        array.flags.writeable = False  # shared by every call for this size
    return rows, cols, basis


def _fit_backdrop(lab: np.ndarray, border_px: int, degree: int) -> tuple[np.ndarray, float]:
    """(backdrop Lab image fitted on the border band, median border residual = the noise scale).

    No BLAS call here is large enough for OpenBLAS to start its threads: in a pipeline that runs
    one task per core, its threads only fight the other tasks' (measured: 5 ms per frame alone,
    100 ms per frame on a loaded 2-core machine with np.linalg.lstsq on the band and a matmul for
    the image). So the fit solves the 6 x 6 normal equations, and the image is evaluated with
    einsum (numpy's own loops).
    """
    h, w, _ = lab.shape
    terms = _monomials(degree)
    rows, cols, basis = _border_samples(h, w, border_px, degree)
    colours = lab[rows, cols].astype(np.float64)

    inliers = np.ones(len(colours), bool)
    for _ in range(_FIT_ITERATIONS):
        b, c = basis[inliers], colours[inliers]
        # lstsq on the normal equations: the same minimum-norm least-squares fit as on the band.
        coef, *_ = np.linalg.lstsq(np.einsum("ni,nj->ij", b, b), np.einsum("ni,nc->ic", b, c), rcond=None)
        residual = np.linalg.norm(colours - np.einsum("ni,ic->nc", basis, coef), axis=1)
        noise = float(np.median(residual[inliers]))
        # A noise-free backdrop (synthetic, flat) gives noise 0: keep exact matches as inliers.
        keep = residual <= max(_OUTLIER_SCALES * noise, 1e-3)
        if keep.sum() < len(terms) * 4:  # too few backdrop pixels left to refit: stop here
            break
        inliers = keep

    # Evaluate separably: sum_ij c_ij x^i y^j = sum_j y^j A_j(x) with A_j(x) = sum_i c_ij x^i.
    xs, ys = np.linspace(-1, 1, w, dtype=np.float32), np.linspace(-1, 1, h, dtype=np.float32)
    powers = np.arange(degree + 1, dtype=np.float32)
    a = np.zeros((degree + 1, w, 3), np.float32)
    for (i, j), c in zip(terms, coef.astype(np.float32)):
        a[j] += xs[:, None] ** i * c
    return np.einsum("hj,jwc->hwc", ys[:, None] ** powers, a), noise


def foreground_mask(rgb: np.ndarray, settings: ClassicSettings) -> np.ndarray:
    """(H, W) bool: pixels whose colour differs from the fitted backdrop beyond its noise."""
    lab = cv2.cvtColor(np.multiply(rgb, np.float32(1 / 255), dtype=np.float32), cv2.COLOR_RGB2Lab)
    backdrop, noise = _fit_backdrop(lab, settings.classic_border_px, settings.classic_degree)
    # Squared Lab distance > squared threshold, in OpenCV (one pass each, without the GIL).
    difference = cv2.subtract(lab, backdrop)
    distance_sq = cv2.transform(cv2.multiply(difference, difference), np.ones((1, 3), np.float32))
    threshold = max(settings.classic_threshold_k * noise, settings.classic_min_delta_e)
    mask = cv2.compare(distance_sq, threshold**2, cv2.CMP_GT)  # 0 / 255
    # Opening drops isolated noise pixels; closing rejoins a product split by a backdrop-coloured seam.
    kernel = _speckle_kernel(rgb.shape[0])
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    return mask.astype(bool)


@functools.lru_cache(maxsize=8)
def _speckle_kernel(height: int) -> np.ndarray:
    """An ellipse of about 5 px per 480 lines (3 at the segment stage's 240), odd, at least 3."""
    size = max(3, 2 * round(height / 192) + 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    kernel.flags.writeable = False  # shared by every call for this height
    return kernel


def count_objects(mask: np.ndarray, min_fraction: float) -> int:
    """Number of connected components of at least `min_fraction` of the frame."""
    _, stats = connected_components(mask, connectivity=8)
    return int((stats[1:, cv2.CC_STAT_AREA] >= min_fraction * mask.size).sum())


class ClassicSegmenter:
    """Backdrop colour model per frame; the text prompt is not used (a studio shows one thing)."""

    name = "classic"

    def __init__(self, settings: ClassicSettings):
        self.settings = settings

    def segment(self, frames: np.ndarray, prompt: str) -> SegmentationOutput:
        masks = np.stack([foreground_mask(rgb, self.settings) for rgb in frames])
        counts = [count_objects(m, self.settings.classic_min_object_fraction) for m in masks]
        # The median over frames: two products that touch for a few frames are still two.
        return SegmentationOutput(masks=masks, num_objects=int(np.median(counts)))
