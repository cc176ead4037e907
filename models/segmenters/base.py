"""What every segmenter returns, and the one method it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np


@dataclass(frozen=True)
class SegmentationOutput:
    """Product masks of one clip.

    `num_objects` is how many distinct products the segmenter found (0: none, > 1: the clip shows
    several and cannot teach "put this one product here"). `scores` is a per-frame confidence in
    [0, 1] where the backend has one.
    """

    masks: np.ndarray  # (T, H, W) bool
    num_objects: int
    scores: np.ndarray | None = None  # (T,) float

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.masks.dtype != np.bool_:
            raise ValueError(f"masks must be a (T, H, W) bool array, got {self.masks.dtype} {self.masks.shape}")
        if self.scores is not None and self.scores.shape != (len(self.masks),):
            raise ValueError(f"scores must have shape ({len(self.masks)},), got {self.scores.shape}")


def connected_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, stats) of cv2.connectedComponentsWithStats for a bool (H, W) mask. Labels are
    16-bit (faster to write) where a frame of this size cannot hold more components (a
    checkerboard has H*W/2)."""
    ltype = cv2.CV_16U if mask.size // 2 + 1 < 2**16 else cv2.CV_32S
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=connectivity, ltype=ltype)
    return labels, stats


class Segmenter(Protocol):
    name: str  # recorded in the masks manifest

    def segment(self, frames: np.ndarray, prompt: str) -> SegmentationOutput:
        """frames: (T, H, W, 3) uint8 RGB; prompt: what the product is, e.g. "a red mug"."""
        ...
