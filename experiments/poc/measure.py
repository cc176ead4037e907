"""The measures of issue 14 on unseen test products, with no pretrained network: do the photos put
the product in?

Every run is generated on the exact sampler (`plain`: no step cache, no compilation), the same
seed and steps for every clip and condition (the run config's `evaluate:` section), batched with
one generator per clip seeded alike, so a clip's noise is the one the evaluate flow gives it:
- A: run A with the clip's own photos; A_none: A without photos (the "no product" branch alone:
  product_guidance_scale 0); A_swap: A with another test product's photos (the next product in
  the sorted list, so every clip gets photos of a product that is not its own); B: the ablation,
  without photos (it never saw any: experiments/poc/__init__.py).

Per clip: mask-region PSNR and SSIM; low-pass mask-region PSNR (both videos blurred, sigma
LOWPASS_SIGMA px: colour and layout without texture); CIE76 Delta E between the mean Lab colours
inside the mask; the colour histogram inside the mask, for retrieval: a generated clip's nearest
test product by histogram intersection against every product's real clip (top-1: is it its own,
chance 1 / products; for A_swap: is it the product whose photos it was given). A - B per clip
with a paired bootstrap 95% interval. On A's test clips also the warping error against the real
clips'; on TRAIN_CLIPS train clips whole-frame PSNR / SSIM (composited, the seed plan's criteria)
beside the mask-region figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from models import metrics as m
from storage.images import save_png
from tasks.training.evaluate import ClipInputs, load_clip, split_rows
from tasks.training.model_store import load_pipeline
from tasks.training.run_config import RunConfig

LOWPASS_SIGMA = 4.0
HISTOGRAM_BINS = 8
BOOTSTRAP = 10000
TRAIN_CLIPS = 16
SHEET_PRODUCTS = 6


@torch.no_grad()
def generate(
    pipe,
    clips: list[ClipInputs],
    photos: list[list[np.ndarray]],
    cfg: RunConfig,
    device: str,
    with_photos: bool = True,
    batch: int = 16,
) -> list[np.ndarray]:
    """(T, H, W, 3) float in [0, 1] per clip, batched; with_photos False: the no-product branch."""
    settings, out = cfg.evaluate, []
    for start in range(0, len(clips), batch):
        part = clips[start : start + batch]
        mask = torch.from_numpy(np.stack([c.masks for c in part]).astype(np.float32))[:, None]
        video = torch.from_numpy(np.stack([c.video for c in part])).permute(0, 4, 1, 2, 3)
        generators = [torch.Generator(device=device).manual_seed(settings.seed) for _ in part]
        result = pipe(
            video * (1 - mask),
            mask,
            photos[start : start + batch],
            [c.prompt for c in part],
            num_inference_steps=settings.num_inference_steps,
            text_guidance_scale=1.0,
            product_guidance_scale=1.0 if with_photos else 0.0,
            generator=generators,
            attention_backend=cfg.model.sampler.attention,
        )
        out += list(result.permute(0, 2, 3, 4, 1).float().cpu().numpy())
    return out


def lab_mean(video: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean CIE Lab colour (OpenCV's float conversion: L in 0-100) of the pixels under the mask."""
    return cv2.cvtColor(video[mask].reshape(-1, 1, 3).astype(np.float32), cv2.COLOR_RGB2Lab).reshape(-1, 3).mean(0)


def histogram(video: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Normalised RGB histogram (HISTOGRAM_BINS per channel) of the pixels under the mask."""
    pixels = video[mask].reshape(-1, 3)
    counts, _ = np.histogramdd(pixels, bins=HISTOGRAM_BINS, range=[(0, 1)] * 3)
    return counts.ravel() / max(counts.sum(), 1)


def lowpass(video: np.ndarray) -> np.ndarray:
    return np.stack([cv2.GaussianBlur(frame, (0, 0), LOWPASS_SIGMA) for frame in video.astype(np.float32)])


def clip_measures(generated: np.ndarray, clip: ClipInputs) -> dict:
    return {
        "psnr_mask": m.psnr(generated, clip.video, clip.masks),
        "ssim_mask": m.ssim(generated, clip.video, clip.masks),
        "psnr_mask_lowpass": m.psnr(lowpass(generated), lowpass(clip.video), clip.masks),
        "delta_e": float(np.linalg.norm(lab_mean(generated, clip.masks) - lab_mean(clip.video, clip.masks))),
    }


def nearest_products(generated: list[np.ndarray], clips: list[ClipInputs]) -> list[str]:
    """For each generated clip, the test product whose real clip's histogram is closest (intersection)."""
    reference = np.stack([histogram(c.video, c.masks) for c in clips])
    products = [c.row["product_id"] for c in clips]
    return [
        products[int(np.minimum(reference, histogram(g, c.masks)).sum(axis=1).argmax())]
        for g, c in zip(generated, clips)
    ]


def paired_bootstrap(differences: np.ndarray, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), (BOOTSTRAP, len(differences)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def swapped(clips: list[ClipInputs]) -> list[int]:
    """Index of the clip whose photos each clip gets: the first clip of the next product (sorted)."""
    products = sorted({c.row["product_id"] for c in clips})
    first = {p: next(i for i, c in enumerate(clips) if c.row["product_id"] == p) for p in products}
    following = {p: products[(i + 1) % len(products)] for i, p in enumerate(products)}
    return [first[following[c.row["product_id"]]] for c in clips]


def _summary(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def measure(models: dict[str, str], dataset: Path, cfg: RunConfig, out: Path, device: str = "cuda", log=print) -> dict:
    """models: {"A": uri, "B": uri}; writes poc-measures.json, per-clip rows and the contact sheet."""
    clips = [load_clip(dataset, row, cfg.data) for row in split_rows(dataset, "test")]
    swap = swapped(clips)
    pipes = {label: load_pipeline(uri, device=device, plain=True)[0] for label, uri in models.items()}
    own = [c.photos for c in clips]
    outputs = {
        "A": generate(pipes["A"], clips, own, cfg, device),
        "A_none": generate(pipes["A"], clips, own, cfg, device, with_photos=False),
        "A_swap": generate(pipes["A"], clips, [clips[j].photos for j in swap], cfg, device),
        "B": generate(pipes["B"], clips, own, cfg, device, with_photos=False),
    }
    log(f"measure: generated {len(clips)} test clips x {len(outputs)} conditions")
    rows = {label: [clip_measures(g, c) for g, c in zip(videos, clips)] for label, videos in outputs.items()}
    products = [c.row["product_id"] for c in clips]
    nearest = {label: nearest_products(videos, clips) for label, videos in outputs.items()}
    difference = np.array([a["psnr_mask"] - b["psnr_mask"] for a, b in zip(rows["A"], rows["B"])])
    low, high = paired_bootstrap(difference)
    warp_generated = [
        m.warping_error(g, mask=c.masks, flows=m.optical_flows(c.video)) for g, c in zip(outputs["A"], clips)
    ]
    warp_real = [m.warping_error(c.video, mask=c.masks) for c in clips]
    train = [load_clip(dataset, row, cfg.data) for row in split_rows(dataset, "train", TRAIN_CLIPS)]
    train_videos = generate(pipes["A"], train, [c.photos for c in train], cfg, device)
    train_rows = [
        {
            "psnr": m.psnr(g, c.video),
            "ssim": m.ssim(g, c.video),
            "psnr_mask": m.psnr(g, c.video, c.masks),
            "ssim_mask": m.ssim(g, c.video, c.masks),
        }
        for g, c in zip(train_videos, train)
    ]
    result = {
        "test": {
            "num_clips": len(clips),
            "num_products": len(set(products)),
            **{
                f"{label.lower()}_{key}": _summary(rows[label], key)
                for label in rows
                for key in ("psnr_mask", "ssim_mask", "psnr_mask_lowpass", "delta_e")
            },
            "a_minus_b_db": float(difference.mean()),
            "a_minus_b_ci95_low_db": low,
            "a_minus_b_ci95_high_db": high,
            **{
                f"retrieval_top1_{label.lower()}": float(np.mean([n == p for n, p in zip(nearest[label], products)]))
                for label in outputs
            },
            "swap_follow": float(np.mean([nearest["A_swap"][i] == products[j] for i, j in enumerate(swap)])),
            "retrieval_chance": 1 / len(set(products)),
        },
        "train": {"num_clips": len(train), **{key: _summary(train_rows, key) for key in train_rows[0]}},
        "warping_error": {"generated": float(np.mean(warp_generated)), "real": float(np.mean(warp_real))},
    }
    result["test"]["a_mask_psnr_db"] = result["test"]["a_psnr_mask"]
    result["test"]["b_mask_psnr_db"] = result["test"]["b_psnr_mask"]
    result["test"]["retrieval_top1"] = result["test"]["retrieval_top1_a"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "poc-measures.json").write_text(json.dumps(result, indent=2) + "\n")
    with (out / "poc-measures-per-clip.jsonl").open("w") as handle:
        for i, clip in enumerate(clips):
            handle.write(
                json.dumps(
                    {
                        "clip_key": clip.row["clip_key"],
                        "product_id": products[i],
                        "swap_photos_of": products[swap[i]],
                        **{label: rows[label][i] | {"nearest": nearest[label][i]} for label in rows},
                    }
                )
                + "\n"
            )
    save_png(out / "poc-contact-sheet.png", contact_sheet(clips, swap, outputs))
    return result


def _flat(photo: np.ndarray, height: int) -> np.ndarray:
    """An RGBA cut-out on white, scaled to `height`."""
    alpha = photo[..., 3:].astype(np.float32) / 255
    rgb = (photo[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return cv2.resize(rgb, (max(1, round(rgb.shape[1] * height / rgb.shape[0])), height), interpolation=cv2.INTER_AREA)


def _frame(video: np.ndarray, index: int) -> np.ndarray:
    """Frame `index` of a float video in [0, 1] as uint8."""
    return np.round(video[index] * 255).astype(np.uint8)


def contact_sheet(clips: list[ClipInputs], swap: list[int], outputs: dict[str, list[np.ndarray]]) -> np.ndarray:
    """Per test product (first SHEET_PRODUCTS): its photos (2 x 2), the swapped product's first
    photo, the masked middle frame, A, B, A_swap, A_none, the truth."""
    lines, seen = [], set()
    for i, clip in enumerate(clips):
        if clip.row["product_id"] in seen or len(seen) == SHEET_PRODUCTS:
            continue
        seen.add(clip.row["product_id"])
        height = clip.video.shape[1]
        middle = len(clip.video) // 2
        photos = [_flat(p, height // 2) for p in clip.photos[:4]]
        photos += [np.full_like(photos[0], 255)] * (4 - len(photos))
        grid = np.concatenate([np.concatenate(photos[:2], axis=1), np.concatenate(photos[2:4], axis=1)], axis=0)
        masked = np.where(clip.masks[middle][..., None], 128, _frame(clip.video, middle)).astype(np.uint8)
        tiles = [
            grid,
            _flat(clips[swap[i]].photos[0], height),
            masked,
            *(_frame(outputs[label][i], middle) for label in ("A", "B", "A_swap", "A_none")),
            _frame(clip.video, middle),
        ]
        gap = np.full((height, 4, 3), 255, np.uint8)
        lines.append(np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1))
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 4), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    return np.concatenate(lines, axis=0)
