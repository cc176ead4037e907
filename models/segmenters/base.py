"""What every segmenter returns, and the one method it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class Segmenter(Protocol):
    name: str  # recorded in the masks manifest

    def segment(self, frames: np.ndarray, prompt: str) -> SegmentationOutput:
        """frames: (T, H, W, 3) uint8 RGB; prompt: what the product is, e.g. "a red mug"."""
        ...
