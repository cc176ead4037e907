"""Segmentation stage throughput on one GPU: grounded-sam2 one clip per call vs `segment_many`.

Random weights at the real shapes (they change no timing or memory figure): Grounding DINO base
(Swin-B backbone, BERT-base text encoder), saved with `save_pretrained` with its processor, and
SAM2.1 hiera-large, saved as a `{"model": state_dict}` checkpoint; both loaded back through
`GroundedSam2Settings`, as the stage loads them. Synthetic 480 x 720 clips: a coloured rectangle
moving over noise. bf16 autocast on CUDA, as the segmenter runs.

With random weights the detector's scores are arbitrary: the box threshold is low enough that
boxes are found on every clip, and the run fails if a clip goes untracked (a clip without a box
skips SAM2 and would inflate the figures).

Rows: the per-clip path (one clip per call, what the stage does now), the batched path (all clips
in one call) with the share of mask pixels equal to the per-clip path's, the batched path tracking
three objects per clip, and the batched path's time per step. Prints one JSON line per row, a
markdown table last, and writes $OUT/gpu_segmentation.json when OUT is set.

GPU box, from the repo root, with sam2 and its dependencies (.whl/seg) and this project's own
(pydantic, prefect: tasks.dataset.stage is imported) installed:
    OUT=/tmp/out TQDM_DISABLE=1 python3 -m benchmarks.gpu_segmentation
CPU smoke run of the same code on tiny models (seconds):
    TQDM_DISABLE=1 python -m benchmarks.gpu_segmentation --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers

from models.segmenters.base import SegmentationOutput
from models.segmenters.grounded_sam2 import GroundedSam2Segmenter, GroundedSam2Settings, keyframe_indices
from models.tiny import TINY_SAM2, TINY_SAM2_OVERRIDES

PROMPT = "a red ceramic mug"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "ceramic", "mug"]
# Random detector scores: low enough that every clip gets boxes (checked), so SAM2 always runs.
BOX_THRESHOLD = 0.05
SWIN_B = dict(
    image_size=384, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, out_indices=[2, 3, 4]
)
SAM2_LARGE = "configs/sam2.1/sam2.1_hiera_l.yaml"
# The tests' tiny models: 64-px Swin, one-layer BERT; SAM2 at 128 px with 5 Hiera blocks.
TINY_SWIN = dict(
    image_size=64,
    patch_size=4,
    embed_dim=8,
    depths=[1, 1, 1, 1],
    num_heads=[1, 1, 1, 1],
    window_size=4,
    out_indices=[2, 3, 4],
)
TINY_BERT = dict(
    vocab_size=len(VOCAB),
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=64,
)
TINY_DINO = dict(
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


def save_grounding_dino(folder: Path, tiny: bool) -> str:
    """A random Grounding DINO (base, or the tests' tiny one) and its processor, saved to `folder`."""
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

    if tiny:
        config = GroundingDinoConfig(
            backbone_config=SwinConfig(**TINY_SWIN), text_config=BertConfig(**TINY_BERT), **TINY_DINO
        )
        image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    else:  # BertConfig's defaults are BERT-base; the image processor's, grounding-dino-base's 800 x 1333
        config = GroundingDinoConfig(backbone_config=SwinConfig(**SWIN_B), text_config=BertConfig())
        image_processor = GroundingDinoImageProcessorPil()
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)})
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def save_sam2(path: Path, tiny: bool) -> dict:
    """A random SAM2.1 (hiera-large, or the tests' tiny one) saved as SAM2's releases are; the
    GroundedSam2Settings fields that load it."""
    from sam2.build_sam import build_sam2_video_predictor

    config, overrides = (TINY_SAM2, TINY_SAM2_OVERRIDES) if tiny else (SAM2_LARGE, [])
    predictor = build_sam2_video_predictor(config, None, device="cpu", hydra_overrides_extra=overrides)
    torch.save({"model": predictor.state_dict()}, path)
    return {"sam2_config": config, "sam2_checkpoint": str(path), "sam2_overrides": overrides}


def synthetic_clips(count: int, frames: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    """(T, H, W, 3) uint8 clips: dim noise with a bright rectangle moving left to right across it."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        clip = rng.integers(0, 96, (frames, height, width, 3), dtype=np.uint8)
        box_h, box_w = height // 3, width // 4
        top, left = rng.integers(0, height - box_h), rng.integers(0, width // 4)
        for t, x in enumerate(np.linspace(left, width - box_w, frames).astype(int)):
            clip[t, top : top + box_h, x : x + box_w] = rng.integers(128, 256, 3)
        clips.append(clip)
    return clips


def load_segmenter(folder: Path, tiny: bool, device: str) -> GroundedSam2Segmenter:
    settings = GroundedSam2Settings(
        grounding_dino=save_grounding_dino(folder / "grounding-dino", tiny),
        **save_sam2(folder / "sam2.pt", tiny),
        box_threshold=BOX_THRESHOLD,
        device=device,
    )
    return GroundedSam2Segmenter(settings)


def timed(run: Callable, cuda: bool) -> tuple[object, float, float | None]:
    """(result, wall seconds, peak GPU GiB) of one synchronised call."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return result, seconds, round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None


def path_row(name: str, outputs: list[SegmentationOutput], seconds: float, peak_gib: float | None) -> dict:
    """Throughput of one path; raises if a clip went untracked (no box: SAM2 skipped, fps inflated)."""
    untracked = [i for i, found in enumerate(outputs) if found.num_objects == 0]
    if untracked:
        raise RuntimeError(
            f"{name}: no box on clips {untracked} of {len(outputs)}, so SAM2 never ran on them and the "
            f"figures would be inflated: lower BOX_THRESHOLD ({BOX_THRESHOLD})"
        )
    frames = sum(len(found.masks) for found in outputs)
    return {
        "name": name,
        "clips": len(outputs),
        "clips_tracked": len(outputs) - len(untracked),
        "frames": frames,
        "seconds": round(seconds, 3),
        "frames_per_s": round(frames / seconds, 1),
        "peak_gpu_gib": peak_gib,
        "products_found_mean": round(float(np.mean([found.num_objects for found in outputs])), 1),
        "mask_coverage_mean": round(float(np.mean([found.masks.mean() for found in outputs])), 4),
    }


def equal_mask_pixels(a: list[SegmentationOutput], b: list[SegmentationOutput]) -> float:
    """Share of mask pixels, over all clips, on which two runs agree."""
    equal = sum(int((x.masks == y.masks).sum()) for x, y in zip(a, b))
    return equal / sum(x.masks.size for x in a)


def step_seconds(segmenter: GroundedSam2Segmenter, clips: list[np.ndarray], prompts: list[str], cuda: bool) -> dict:
    """Seconds of each step of `segment_many` on `clips`: where the time of the batched path goes
    (detector_preprocess_s: the share of detect_s the processor takes on the CPU)."""
    keyframes = [clip[keyframe_indices(len(clip), segmenter.settings.num_keyframes)] for clip in clips]
    processor = segmenter._models.processor
    _, preprocess_s, _ = timed(lambda: [processor(images=list(k), text=[PROMPT] * len(k)) for k in keyframes], cuda)
    detections, detect_s, _ = timed(lambda: segmenter._detect_keyframes(keyframes, prompts), cuda)
    encoded, encode_s, _ = timed(lambda: segmenter._encode(clips), cuda)
    seeds = [
        segmenter._seed(keyframe_indices(len(clip), segmenter.settings.num_keyframes), found, 1)
        for clip, found in zip(clips, detections)
    ]
    _, track_s, _ = timed(
        lambda: [
            segmenter._track(clip.shape[1:3], seed, features) for clip, seed, features in zip(clips, seeds, encoded)
        ],
        cuda,
    )
    frames = sum(len(clip) for clip in clips)
    return {
        "name": "batched-steps",
        "detect_s": round(detect_s, 3),
        "detector_preprocess_s": round(preprocess_s, 3),
        "encode_s": round(encode_s, 3),
        "track_s": round(track_s, 3),
        "encode_frames_per_s": round(frames / encode_s, 1),
        "track_frames_per_s": round(frames / track_s, 1),
    }


def bench_segmentation(device: str, tiny: bool, clips: int | None = None, frames: int | None = None) -> list[dict]:
    """Rows (dicts with a "name") of the per-clip and batched paths on `clips` synthetic clips of
    `frames` frames (default: 8 x 49, tiny 3 x 9)."""
    cuda = torch.device(device).type == "cuda"
    clips, frames = clips or (3 if tiny else 8), frames or (9 if tiny else 49)
    height, width = (48, 72) if tiny else (480, 720)
    torch.manual_seed(0)  # the same random models every run
    with tempfile.TemporaryDirectory(prefix="bench-seg-") as folder:
        segmenter = load_segmenter(Path(folder), tiny, device)  # the weights are in memory once loaded
    data = synthetic_clips(clips, frames, height, width, seed=0)
    warm_up = synthetic_clips(2, frames, height, width, seed=1)
    prompts = [PROMPT] * clips
    rows = [
        {
            "name": "setup",
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "detector": "tiny" if tiny else "grounding-dino-base",
            "sam2": "tiny" if tiny else "sam2.1-hiera-l",
            "sam2_image_size": segmenter._models.predictor.image_size,
            "clip": [frames, height, width],
        }
    ]

    segmenter.segment(warm_up[0], PROMPT)
    per_clip, seconds, peak = timed(lambda: [segmenter.segment(clip, p) for clip, p in zip(data, prompts)], cuda)
    rows.append(path_row("per-clip", per_clip, seconds, peak))

    segmenter.segment_many(warm_up, [PROMPT] * len(warm_up))
    batched, seconds, peak = timed(lambda: segmenter.segment_many(data, prompts), cuda)
    rows.append(
        {
            **path_row("batched", batched, seconds, peak),
            "equal_mask_pixels": round(equal_mask_pixels(per_clip, batched), 6),
            "same_num_objects": all(a.num_objects == b.num_objects for a, b in zip(per_clip, batched)),
        }
    )

    several, seconds, peak = timed(lambda: segmenter.segment_many(data, prompts, max_objects=3), cuda)
    rows.append(path_row("batched-3-objects", several, seconds, peak))
    rows.append(step_seconds(segmenter, data, prompts, cuda))
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(key, "")) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny models")
    parser.add_argument("--device", default=None, help="default: cpu with --tiny, else cuda")
    parser.add_argument("--clips", type=int, default=None, help="default: 3 with --tiny, else 8")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip; default: 9 with --tiny, else 49")
    args = parser.parse_args()
    rows = bench_segmentation(args.device or ("cpu" if args.tiny else "cuda"), args.tiny, args.clips, args.frames)
    for row in rows:
        print(json.dumps(row), flush=True)
    print("\n" + markdown_table(rows))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_segmentation.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
