"""Product segmenters: one interface (`Segmenter.segment(frames, prompt)`), two backends."""

from __future__ import annotations

from pydantic import BaseModel

from models.segmenters.base import SegmentationOutput, Segmenter
from models.segmenters.classic import ClassicSegmenter, ClassicSettings
from models.segmenters.grounded_sam2 import GroundedSam2Segmenter, GroundedSam2Settings

__all__ = [
    "ClassicSegmenter",
    "ClassicSettings",
    "GroundedSam2Segmenter",
    "GroundedSam2Settings",
    "SegmentationOutput",
    "Segmenter",
    "load_segmenter",
]


def _backend_settings(settings_type: type[BaseModel], cfg: BaseModel) -> BaseModel:
    """The backend's own fields of a larger config (so unrelated options never reload a model)."""
    return settings_type.model_validate(cfg.model_dump(include=set(settings_type.model_fields)))


def load_segmenter(cfg: BaseModel) -> Segmenter:
    """The backend named by `cfg.backend`, built from its fields of `cfg` (e.g. SegmentConfig).

    Raises storage.errors.SystemicError when the backend's weights cannot be loaded.
    """
    if cfg.backend == "classic":
        return ClassicSegmenter(_backend_settings(ClassicSettings, cfg))
    if cfg.backend == "grounded-sam2":
        return GroundedSam2Segmenter(_backend_settings(GroundedSam2Settings, cfg))
    raise ValueError(f"unknown segmenter backend {cfg.backend!r}: use 'grounded-sam2' or 'classic'")
