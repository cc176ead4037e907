"""Text-prompted product segmentation: Grounding DINO finds the product, SAM2 tracks it.

Grounding DINO (transformers) looks for the prompt on a few keyframes; the box with the highest
score seeds SAM2's video predictor on its frame, which propagates the mask forward and backward
from there, so a product that is small or hidden at the start of a clip is still found. Several
confident boxes that do not overlap on the seed frame mean several products (`num_objects`).

Weights are never downloaded here: `grounding_dino` is a hub id (works only with hub access or a
populated cache) or a local folder saved with `save_pretrained`; `sam2_checkpoint` is a local
`.pt` file from the SAM2 release that matches `sam2_config`. Only SAM2's video predictor is used:
its image predictor imports torchvision, which this project must not need.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field

from models.segmenters.base import SegmentationOutput
from tasks.stage import SystemicError

_SAM2_RELEASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
_CLASSIC_HINT = "or, for footage on a clean studio backdrop, use segmenter='classic' (SegmentConfig backend='classic')"


class GroundedSam2Settings(BaseModel):
    grounding_dino: str = Field(
        "IDEA-Research/grounding-dino-base", description="hub id or local folder (save_pretrained: model + processor)"
    )
    box_threshold: float = Field(0.35, gt=0, lt=1, description="detector score from which a box is a product")
    text_threshold: float = Field(0.25, gt=0, lt=1, description="token score for the detector's phrase labels")
    num_keyframes: int = Field(5, ge=1, description="frames, evenly spaced, on which the detector runs")
    duplicate_box_overlap: float = Field(
        0.5, gt=0, le=1, description="boxes overlapping more than this (of the smaller box) are one product"
    )
    sam2_config: str = Field("configs/sam2.1/sam2.1_hiera_l.yaml", description="config inside the sam2 package")
    sam2_checkpoint: str | None = Field(None, description="local SAM2 checkpoint (.pt) matching sam2_config")
    sam2_overrides: list[str] = Field(
        default_factory=list, description="hydra overrides of sam2_config (must match the checkpoint)"
    )
    device: str = Field("auto", description="'auto' (cuda if available), 'cuda', 'cuda:1', 'cpu'...")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class _Models:
    detector: torch.nn.Module  # GroundingDinoForObjectDetection
    processor: object  # GroundingDinoProcessor with the PIL image processor
    predictor: torch.nn.Module  # sam2.sam2_video_predictor.SAM2VideoPredictor
    device: torch.device


def _is_local_path(source: str) -> bool:
    """Hub ids look like 'org/name'; these can only mean a folder on this machine."""
    return source.startswith(("/", ".", "~")) or Path(source).exists()


def _load_grounding_dino(source: str, device: torch.device) -> tuple[torch.nn.Module, object]:
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    if _is_local_path(source) and not Path(source).expanduser().is_dir():
        raise SystemicError(
            f"Grounding DINO folder {source!r} does not exist: download the model with its processor "
            "(e.g. `hf download IDEA-Research/grounding-dino-base --local-dir DIR` on a machine with hub "
            f"access) and set grounding_dino=DIR, {_CLASSIC_HINT}"
        )
    location = str(Path(source).expanduser()) if _is_local_path(source) else source
    try:
        # The PIL ("slow") image processor: the torchvision one cannot be imported here.
        processor = AutoProcessor.from_pretrained(location, backend="pil")
        detector = GroundingDinoForObjectDetection.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise SystemicError(
            f"cannot load Grounding DINO from {source!r} ({exc}): download it with its processor to a "
            f"folder and set grounding_dino to that folder, {_CLASSIC_HINT}"
        ) from exc
    return detector.to(device).eval(), processor


def _load_sam2(settings: GroundedSam2Settings, device: torch.device) -> torch.nn.Module:
    if settings.sam2_checkpoint is None:
        raise SystemicError(
            f"sam2_checkpoint is not set: download a SAM2 checkpoint (e.g. {_SAM2_RELEASE}) and set "
            f"sam2_checkpoint to its path with the matching sam2_config, {_CLASSIC_HINT}"
        )
    checkpoint = Path(settings.sam2_checkpoint).expanduser()
    if not checkpoint.is_file():
        raise SystemicError(
            f"SAM2 checkpoint {str(checkpoint)!r} does not exist: download it (e.g. {_SAM2_RELEASE}) and "
            f"set sam2_checkpoint to its path, {_CLASSIC_HINT}"
        )
    from sam2.build_sam import build_sam2_video_predictor

    try:
        predictor = build_sam2_video_predictor(
            settings.sam2_config, str(checkpoint), device=device, hydra_overrides_extra=list(settings.sam2_overrides)
        )
    except Exception as exc:  # hydra, torch.load and load_state_dict each raise their own types
        raise SystemicError(
            f"cannot build SAM2 from config {settings.sam2_config!r} and checkpoint {str(checkpoint)!r} "
            f"({type(exc).__name__}: {exc}): the config (a path inside the sam2 package, plus "
            "sam2_overrides) must be the one the checkpoint was trained with"
        ) from exc
    # Small holes are filled by the stage's post-processing at full resolution; SAM2's own hole
    # filling needs its CUDA extension and only warns without it.
    predictor.fill_hole_area = 0
    return predictor


@functools.cache
def _load_models(settings_json: str) -> _Models:
    """Both networks, once per process and settings (keyed by the settings' JSON)."""
    settings = GroundedSam2Settings.model_validate_json(settings_json)
    device = resolve_device(settings.device)
    detector, processor = _load_grounding_dino(settings.grounding_dino, device)
    return _Models(detector, processor, _load_sam2(settings, device), device)


def detector_prompt(prompt: str) -> str:
    """Grounding DINO expects lower-case phrases, each ending with a period."""
    return prompt.strip().lower().rstrip(".").strip() + "."


def distinct_boxes(boxes: np.ndarray, scores: np.ndarray, max_overlap: float) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) of distinct products, best first.

    A box is dropped when more than `max_overlap` of the smaller of it and a better box is shared:
    a duplicate, or a part (label, lid) of a product already kept.
    """
    kept: list[np.ndarray] = []
    for i in np.argsort(-scores):
        box = boxes[i]
        area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-6)
        if all(_intersection(box, k) <= max_overlap * min(area, (k[2] - k[0]) * (k[3] - k[1])) for k in kept):
            kept.append(box)
    return np.array(kept, dtype=np.float32).reshape(-1, 4)


def _intersection(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return float(max(w, 0) * max(h, 0))


class GroundedSam2Segmenter:
    name = "grounded-sam2"

    def __init__(self, settings: GroundedSam2Settings):
        self.settings = settings
        self._models = _load_models(settings.model_dump_json())

    def segment(self, frames: np.ndarray, prompt: str) -> SegmentationOutput:
        t, h, w, _ = frames.shape
        keyframes = np.unique(np.linspace(0, t - 1, min(self.settings.num_keyframes, t)).round().astype(int))
        detections = self._detect(frames[keyframes], prompt)
        top_scores = [float(s.max()) if len(s) else 0.0 for s, _ in detections]
        best = int(np.argmax(top_scores))
        if top_scores[best] == 0.0:  # the product was not found on any keyframe
            return SegmentationOutput(np.zeros((t, h, w), bool), num_objects=0, scores=np.zeros(t))
        scores, boxes = detections[best]
        products = distinct_boxes(boxes, scores, self.settings.duplicate_box_overlap)
        masks, mask_scores = self._track(frames, int(keyframes[best]), products[0])
        return SegmentationOutput(masks, num_objects=len(products), scores=mask_scores)

    @torch.inference_mode()
    def _detect(self, images: np.ndarray, prompt: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image: (scores (N,), boxes (N, 4) in pixels) of boxes above the box threshold."""
        m = self._models
        text = detector_prompt(prompt)
        inputs = m.processor(images=list(images), text=[text] * len(images), return_tensors="pt").to(m.device)
        outputs = m.detector(**inputs)
        results = m.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.settings.box_threshold,
            text_threshold=self.settings.text_threshold,
            target_sizes=[img.shape[:2] for img in images],
        )
        return [(r["scores"].float().cpu().numpy(), r["boxes"].float().cpu().numpy()) for r in results]

    @torch.inference_mode()
    def _track(self, frames: np.ndarray, seed_frame: int, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SAM2 masks (T, H, W) of the object in `box` on `seed_frame`, and the mean mask probability."""
        m = self._models
        masks = np.zeros(frames.shape[:3], bool)
        scores = np.zeros(len(frames))
        # The video predictor reads a folder of JPEGs named by frame index; keep it out of the dataset.
        with tempfile.TemporaryDirectory(prefix="sam2-frames-") as folder:
            for i, rgb in enumerate(frames):
                Image.fromarray(rgb).save(Path(folder) / f"{i:05d}.jpg", quality=95)
            with torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=m.device.type == "cuda"):
                state = m.predictor.init_state(folder)
                m.predictor.add_new_points_or_box(state, frame_idx=seed_frame, obj_id=1, box=box)
                for reverse in (False, True):
                    tracked = m.predictor.propagate_in_video(state, start_frame_idx=seed_frame, reverse=reverse)
                    for idx, _, logits in tracked:
                        prob = torch.sigmoid(logits[0, 0].float()).cpu().numpy()
                        masks[idx] = prob > 0.5
                        scores[idx] = float(prob[masks[idx]].mean()) if masks[idx].any() else 0.0
        return masks, scores
