"""Text-prompted product segmentation: Grounding DINO finds the product, SAM2 tracks it.

Grounding DINO (transformers) looks for the prompt on a few keyframes; the box with the highest
score seeds SAM2's video predictor on its frame, which propagates the mask forward and backward
from there, so a product that is small or hidden at the start of a clip is still found. Several
confident boxes that do not overlap on the seed frame mean several products (`num_objects`).

`segment_many` does this for several clips at once, for throughput on a GPU: the detector sees
the keyframes of all clips in batches, SAM2's image encoder sees the frames of all clips in
batches, and tracking then reads those features from SAM2's own feature cache. Frames go to SAM2
from memory (no JPEG round trip). Each clip's result is the one `segment` gives for it alone.

Weights are never downloaded here: `grounding_dino` is a hub id (works only with hub access or a
populated cache) or a local folder saved with `save_pretrained`; `sam2_checkpoint` is a local
`.pt` file from the SAM2 release that matches `sam2_config`. Only SAM2's video predictor is used:
its image predictor imports torchvision, which this project must not need.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from models.device import resolve_device
from models.segmenters.base import SegmentationOutput
from storage.errors import SystemicError

_SAM2_RELEASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
_CLASSIC_HINT = (
    "or, for footage on a clean studio backdrop, use the classic segmenter "
    "(build config: segmentation.backend=classic, as configs/dataset/demo.yaml)"
)
# Images per network call in `segment_many`: enough to fill a GPU; the activations of a batch of
# SAM2 hiera-L at 1024 px are a few GB in bf16.
DETECTOR_BATCH = 8
ENCODER_BATCH = 16
# The normalisation SAM2's video predictor applies to its frames (sam2.utils.misc.load_video_frames).
_SAM2_MEAN = (0.485, 0.456, 0.406)
_SAM2_STD = (0.229, 0.224, 0.225)


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


def keyframe_indices(num_frames: int, count: int) -> np.ndarray:
    """`count` frames evenly spaced over a clip, its first and last included (fewer if it is shorter)."""
    return np.unique(np.linspace(0, num_frames - 1, min(count, num_frames)).round().astype(int))


def sam2_input(frames: np.ndarray, image_size: int, device: torch.device) -> torch.Tensor:
    """(T, 3, S, S) float SAM2 input of (T, H, W, 3) uint8 RGB frames: squashed to S x S (bilinear,
    as SAM2's image transforms resize) and normalised as its video predictor does."""
    images = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float() / 255
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(_SAM2_MEAN, device=device)[:, None, None]
    std = torch.tensor(_SAM2_STD, device=device)[:, None, None]
    return (images - mean) / std


def video_state(
    predictor: torch.nn.Module, images: torch.Tensor, cached_features: dict, height: int, width: int
) -> dict:
    """The inference state `SAM2VideoPredictor.init_state` (sam2 1.1.0) builds, for frames already
    in memory with every frame's features already in `cached_features`.

    init_state only reads frames from files (a JPEG folder: a lossy round trip through the disk)
    and encodes frame 0 itself; with every frame cached, propagation never runs the image encoder.
    """
    return {
        "images": images,  # (T, 3, S, S), read by the predictor only for frames missing from the cache
        "num_frames": len(images),
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": False,
        "video_height": height,
        "video_width": width,
        "device": predictor.device,
        "storage_device": predictor.device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": cached_features,
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass(frozen=True)
class _Seed:
    """Where tracking of a clip starts: the keyframe with the best detection and the boxes on it."""

    frame: int
    boxes: np.ndarray  # (N, 4) pixels, the objects to track
    num_objects: int  # distinct products found on the frame


@dataclass(frozen=True)
class _Encoded:
    """A clip's SAM2 input frames and their image features, as SAM2's feature cache holds them."""

    images: torch.Tensor  # (T, 3, S, S)
    cached_features: dict  # {frame: (image (1, 3, S, S), {"backbone_fpn": [...], "vision_pos_enc": [...]})}


class GroundedSam2Segmenter:
    name = "grounded-sam2"

    def __init__(self, settings: GroundedSam2Settings):
        self.settings = settings
        self._models = _load_models(settings.model_dump_json())

    def segment(self, frames: np.ndarray, prompt: str) -> SegmentationOutput:
        return self.segment_many([frames], [prompt])[0]

    def segment_many(
        self,
        clips: list[np.ndarray],
        prompts: list[str],
        max_objects: int = 1,
    ) -> list[SegmentationOutput]:
        """`segment` of every clip (T, H, W, 3) with its prompt, the networks batched across clips.

        The features and inputs of all frames of all clips in which a product is found are held at
        once (about 20 MB a frame for hiera-L at 1024 px): pass as many clips as GPU memory holds.
        Up to `max_objects` distinct products per clip are tracked (together, in one SAM2 state),
        their masks merged; one, the best, is what the dataset uses: a clip that shows several is
        rejected on `num_objects` anyway.
        """
        if len(clips) != len(prompts):
            raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts: give one prompt per clip")
        keyframes = [keyframe_indices(len(clip), self.settings.num_keyframes) for clip in clips]
        detections = self._detect_keyframes([clip[k] for clip, k in zip(clips, keyframes)], prompts)
        seeds = [self._seed(k, found, max_objects) for k, found in zip(keyframes, detections)]
        encoded = iter(self._encode([clip for clip, seed in zip(clips, seeds) if seed is not None]))
        outputs = []
        for clip, seed in zip(clips, seeds):
            if seed is None:  # the product was not found on any keyframe
                outputs.append(
                    SegmentationOutput(np.zeros(clip.shape[:3], bool), num_objects=0, scores=np.zeros(len(clip)))
                )
                continue
            masks, scores = self._track(clip.shape[1:3], seed, next(encoded))
            outputs.append(SegmentationOutput(masks, num_objects=seed.num_objects, scores=scores))
        return outputs

    def _seed(
        self, keyframes: np.ndarray, detections: list[tuple[np.ndarray, np.ndarray]], max_objects: int
    ) -> _Seed | None:
        """The keyframe whose best box scores highest, with its distinct boxes; None if no box."""
        top_scores = [float(s.max()) if len(s) else 0.0 for s, _ in detections]
        best = int(np.argmax(top_scores))
        if top_scores[best] == 0.0:
            return None
        scores, boxes = detections[best]
        products = distinct_boxes(boxes, scores, self.settings.duplicate_box_overlap)
        return _Seed(int(keyframes[best]), products[:max_objects], len(products))

    def _detect_keyframes(
        self,
        keyframes: list[np.ndarray],
        prompts: list[str],
    ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per clip, per keyframe: the detections. Only keyframes with the same prompt and size share
        a detector call: the processor pads texts and images to the longest, which changes scores."""
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for c, (images, prompt) in enumerate(zip(keyframes, prompts)):
            key = (detector_prompt(prompt), images.shape[1:])
            groups.setdefault(key, []).extend((c, k) for k in range(len(images)))
        found: list[list] = [[None] * len(images) for images in keyframes]
        for (text, _), members in groups.items():
            for start in range(0, len(members), DETECTOR_BATCH):
                batch = members[start : start + DETECTOR_BATCH]
                results = self._detect(np.stack([keyframes[c][k] for c, k in batch]), text)
                for (c, k), result in zip(batch, results):
                    found[c][k] = result
        return found

    @torch.inference_mode()
    def _detect(self, images: np.ndarray, text: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image: (scores (N,), boxes (N, 4) in pixels) of boxes above the box threshold."""
        m = self._models
        inputs = m.processor(images=list(images), text=[text] * len(images), return_tensors="pt").to(m.device)
        with _autocast(m.device):  # bf16 on CUDA, as SAM2 runs: the fp32 detector took a third of the stage
            outputs = m.detector(**inputs)
        # Boxes are scaled to pixels in fp32: in bf16 a coordinate near 720 would be rounded to 4 px.
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        results = m.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.settings.box_threshold,
            text_threshold=self.settings.text_threshold,
            target_sizes=[img.shape[:2] for img in images],
        )
        return [(r["scores"].float().cpu().numpy(), r["boxes"].float().cpu().numpy()) for r in results]

    @torch.inference_mode()
    def _encode(self, clips: list[np.ndarray]) -> list[_Encoded]:
        """SAM2's image features of every frame of `clips`, ENCODER_BATCH frames (across clips) a call."""
        m = self._models
        images = [sam2_input(clip, m.predictor.image_size, m.device) for clip in clips]
        frames = [(c, f) for c, clip_images in enumerate(images) for f in range(len(clip_images))]
        cached: list[dict] = [{} for _ in clips]
        pos_enc = None
        for start in range(0, len(frames), ENCODER_BATCH):
            batch = frames[start : start + ENCODER_BATCH]
            with _autocast(m.device):
                out = m.predictor.forward_image(torch.stack([images[c][f] for c, f in batch]))
            # The position encoding depends on the feature size only: one copy serves every frame.
            pos_enc = pos_enc or [pos[:1].clone() for pos in out["vision_pos_enc"]]
            for i, (c, f) in enumerate(batch):
                features = {
                    "backbone_fpn": [level[i : i + 1] for level in out["backbone_fpn"]],
                    "vision_pos_enc": pos_enc,
                }
                cached[c][f] = (images[c][f].unsqueeze(0), features)
        return [_Encoded(clip_images, features) for clip_images, features in zip(images, cached)]

    @torch.inference_mode()
    def _track(self, size: tuple[int, int], seed: _Seed, encoded: _Encoded) -> tuple[np.ndarray, np.ndarray]:
        """SAM2 masks (T, H, W) of the objects in `seed.boxes` (merged), and the mean mask probability."""
        m = self._models
        probs = torch.zeros((len(encoded.images), *size), device=m.device)
        with _autocast(m.device):
            state = video_state(m.predictor, encoded.images, encoded.cached_features, *size)
            for obj_id, box in enumerate(seed.boxes, start=1):
                m.predictor.add_new_points_or_box(state, frame_idx=seed.frame, obj_id=obj_id, box=box)
            for reverse in (False, True):
                tracked = m.predictor.propagate_in_video(state, start_frame_idx=seed.frame, reverse=reverse)
                for idx, _, logits in tracked:
                    # Kept on the device: a copy per frame would make the GPU wait for the host.
                    probs[idx] = torch.sigmoid(logits[:, 0].float()).amax(dim=0)
        masks = probs > 0.5
        scores = (probs * masks).sum(dim=(1, 2)) / masks.sum(dim=(1, 2)).clamp(min=1)
        return masks.cpu().numpy(), scores.double().cpu().numpy()
