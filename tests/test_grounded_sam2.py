"""grounded-sam2 backend end to end on tiny random models, saved and loaded the way users load weights.

Random weights give random masks: these tests check that the real loading and inference code runs
and returns well-formed output, and that missing weights stop the run with a helpful message.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from models.segmenters import GroundedSam2Segmenter, grounded_sam2, load_segmenter
from models.segmenters.grounded_sam2 import detector_prompt, distinct_boxes
from models.tiny import TINY_SAM2, TINY_SAM2_OVERRIDES  # small enough for CPU tests
from storage.errors import SystemicError
from storage.layout import DatasetRoot
from storage.video import write_video
from tasks.dataset.segment import SegmentConfig, segment_clip

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "ceramic", "mug", "shoe"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """A tiny Grounding DINO folder (model + processor) and a tiny SAM2 checkpoint file."""
    from sam2.build_sam import build_sam2_video_predictor
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(VOCAB),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
        d_model=32,
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)}),
    )
    GroundingDinoForObjectDetection(config).save_pretrained(folder / "grounding-dino")
    processor.save_pretrained(folder / "grounding-dino")

    sam2 = build_sam2_video_predictor(TINY_SAM2, None, device="cpu", hydra_overrides_extra=TINY_SAM2_OVERRIDES)
    torch.save({"model": sam2.state_dict()}, folder / "sam2_tiny.pt")  # the layout of SAM2's releases
    return {
        "grounding_dino": str(folder / "grounding-dino"),
        "sam2_config": TINY_SAM2,
        "sam2_checkpoint": str(folder / "sam2_tiny.pt"),
        "sam2_overrides": TINY_SAM2_OVERRIDES,
        "device": "cpu",
        "box_threshold": 0.05,  # random weights score low; let boxes through so SAM2 runs
        "num_keyframes": 3,
    }


def random_frames(t: int = 6, h: int = 48, w: int = 72) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (t, h, w, 3), dtype=np.uint8)


def test_runs_end_to_end_from_saved_weights(weights):
    segmenter = load_segmenter(SegmentConfig(**weights))
    assert isinstance(segmenter, GroundedSam2Segmenter)
    frames = random_frames()
    found = segmenter.segment(frames, "A red mug")
    assert found.masks.shape == (6, 48, 72) and found.masks.dtype == np.bool_
    assert found.num_objects >= 1  # the low box threshold lets boxes through, so SAM2 did run
    assert found.scores.shape == (6,) and ((found.scores >= 0) & (found.scores <= 1)).all()
    assert "torchvision" not in sys.modules


def test_models_load_once_per_settings(weights):
    first = load_segmenter(SegmentConfig(**weights))
    # Post-processing options are not the backend's: they must not reload the networks.
    second = load_segmenter(SegmentConfig(**weights, dilate_px=4, min_coverage=0.01))
    assert first._models is second._models


def test_stage_sets_aside_what_the_segmenter_finds_on_noise(weights, tmp_path):
    """Random weights on random frames (both seeded) find several objects: the stage writes no
    mask and one reject row that names the clip and the reason."""
    ds = DatasetRoot.create(tmp_path)
    with ds.atomic_file(ds.clip_video_rel("P001_c000")) as video:
        write_video(video, random_frames(6, 64, 96), fps=24)
    clip = {
        "clip_key": "P001_c000",
        "product_id": "P001",
        "clip_id": "c000",
        "video_path": ds.clip_video_rel("P001_c000"),
        "num_frames": 6,
    }
    result = segment_clip(clip, "red mug", str(tmp_path), SegmentConfig(**weights))
    assert result["rows"] == [] and [r["reason_code"] for r in result["rejects"]] == ["multiple_products"]
    assert result["rejects"][0]["product_id"] == "P001" and not ds.path(ds.mask_dir_rel("P001_c000")).exists()


CLASSIC_HINT = "use the classic segmenter (build config: segmentation.backend=classic"


@pytest.mark.parametrize(
    ("override", "expected", "fix"),
    [
        ({"grounding_dino": "/nonexistent/grounding-dino"}, "Grounding DINO folder", "set grounding_dino=DIR"),
        ({"sam2_checkpoint": None}, "sam2_checkpoint is not set", "set sam2_checkpoint to its path"),
        ({"sam2_checkpoint": "/nonexistent/sam2.pt"}, "does not exist", "set sam2_checkpoint to its path"),
        ({"sam2_overrides": []}, "cannot build SAM2", "must be the one the checkpoint was trained with"),
    ],
)
def test_missing_or_mismatched_weights_are_systemic(weights, override, expected, fix):
    """Each failure names itself and its own fix; a missing weight also offers the weights-free backend."""
    with pytest.raises(SystemicError, match=expected) as caught:
        load_segmenter(SegmentConfig(**{**weights, **override}))
    assert fix in str(caught.value)
    assert (CLASSIC_HINT in str(caught.value)) == ("sam2_overrides" not in override)


def test_distinct_boxes_drops_duplicates_and_parts():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [2, 2, 4, 4], [20, 0, 30, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    kept = distinct_boxes(boxes, scores, max_overlap=0.5)
    assert kept.tolist() == [[0, 0, 10, 10], [20, 0, 30, 10]]


def test_detector_prompt_is_a_lower_case_phrase():
    assert detector_prompt("  A Red Mug. ") == "a red mug."


def clips_of_several_sizes() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.integers(0, 255, shape, dtype=np.uint8)
        for shape in [(6, 48, 72, 3), (5, 48, 72, 3), (4, 40, 64, 3), (3, 48, 72, 3)]
    ]


def test_batched_path_equals_one_clip_at_a_time(weights, monkeypatch):
    # Small batches, so that detector and encoder calls mix clips and end mid-clip.
    monkeypatch.setattr(grounded_sam2, "DETECTOR_BATCH", 2)
    monkeypatch.setattr(grounded_sam2, "ENCODER_BATCH", 4)
    segmenter = load_segmenter(SegmentConfig(**weights))
    clips = clips_of_several_sizes()
    prompts = ["red mug", "A red mug.", "red mug", "shoe"]
    batched = segmenter.segment_many(clips, prompts)
    assert len(batched) == len(clips)
    for clip, prompt, together in zip(clips, prompts, batched):
        alone = segmenter.segment(clip, prompt)
        assert together.num_objects == alone.num_objects >= 1  # SAM2 ran on every clip
        np.testing.assert_array_equal(together.masks, alone.masks)
        np.testing.assert_allclose(together.scores, alone.scores, rtol=1e-6, atol=1e-7)


def test_every_frame_is_encoded_once_and_tracking_reuses_it(weights, monkeypatch):
    monkeypatch.setattr(grounded_sam2, "ENCODER_BATCH", 4)
    segmenter = load_segmenter(SegmentConfig(**weights))
    predictor = segmenter._models.predictor
    batch_sizes = []
    encode = predictor.forward_image
    monkeypatch.setattr(predictor, "forward_image", lambda images: batch_sizes.append(len(images)) or encode(images))
    clips = clips_of_several_sizes()
    segmenter.segment_many(clips, ["red mug"] * len(clips))
    assert batch_sizes == [4, 4, 4, 4, 2]  # 18 frames, 4 a call across clips, none again while tracking


def test_several_objects_are_tracked_in_one_state(weights):
    segmenter = load_segmenter(SegmentConfig(**weights, duplicate_box_overlap=1.0))
    clip = clips_of_several_sizes()[0]
    (one,) = segmenter.segment_many([clip], ["red mug"])
    (several,) = segmenter.segment_many([clip], ["red mug"], max_objects=3)
    assert several.num_objects == one.num_objects >= 3
    assert (several.masks >= one.masks).all()  # the best product's mask, merged with the others'


def test_state_from_memory_has_what_init_state_builds(weights, tmp_path):
    from PIL import Image

    segmenter = load_segmenter(SegmentConfig(**weights))
    predictor = segmenter._models.predictor
    frames = random_frames(2)
    for i, rgb in enumerate(frames):
        Image.fromarray(rgb).save(tmp_path / f"{i:05d}.jpg")
    from_files = predictor.init_state(str(tmp_path))
    (encoded,) = segmenter._encode([frames])
    from_memory = grounded_sam2.video_state(predictor, encoded.images, encoded.cached_features, 48, 72)
    assert from_memory.keys() == from_files.keys()
    for key in ("num_frames", "video_height", "video_width", "device", "storage_device"):
        assert from_memory[key] == from_files[key]
    assert from_memory["images"].shape == from_files["images"].shape
