"""Gate 1 of issue 14, on the CPU before any GPU time: what the mask region's PSNR can be, on the
test clips, in the window and crop the model sees (tasks.training.precompute.load_clip_window).

- vae: the VAE's round trip (encode mode -> decode; Wan's normalisation cancels): the ceiling;
- photo_mean: the mask filled with this product's photo-mean colour (mean RGB over the photo
  pixels with alpha > 0.5): what the photos' colour alone is worth;
- dataset_mean: the mask filled with the mean colour of the train clips' masked pixels: what a
  model without photos can hardly beat by much.

The data passes when photo_mean beats dataset_mean by at least GATE_DB on the mean over clips.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from models.metrics import psnr
from storage.images import load_photo
from storage.layout import DatasetRoot
from tasks.training.precompute import load_clip_window

GATE_DB = 6.0
MAX_PHOTOS = 4  # the photos the model is given (data.max_product_images)
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
MEAN_CLIPS = 200  # train clips the dataset-mean colour is taken from
LOADERS = 16  # threads decoding clips and mask PNGs


def photo_mean_colour(root: DatasetRoot, image_paths: list[str]) -> np.ndarray:
    """(3,) in [0, 1]: mean RGB over the product pixels (alpha > 0.5) of the first photos."""
    pixels = []
    for rel in image_paths[:MAX_PHOTOS]:
        rgb, alpha = load_photo(root.path(rel))
        pixels.append(rgb[alpha > 127] if alpha is not None else rgb.reshape(-1, 3))
    return np.concatenate(pixels).mean(axis=0) / 255


def _window(root: DatasetRoot, row: dict, shape: dict) -> tuple[np.ndarray, np.ndarray]:
    """(video (T, H, W, 3) in [0, 1], mask (T, H, W) bool) of a clip's sample window."""
    video, mask = load_clip_window(root, row["video_path"], row["mask_dir"], **shape)
    return video.permute(1, 2, 3, 0).numpy(), mask[0].numpy() > 0.5


def dataset_mean_colour(root: DatasetRoot, rows: list[dict], shape: dict) -> np.ndarray:
    """(3,) in [0, 1]: mean colour of the masked pixels of the train clips' windows (the first
    MEAN_CLIPS: the first GPU run spent minutes decoding all 800)."""
    total, count = np.zeros(3), 0
    with ThreadPoolExecutor(LOADERS) as pool:
        for video, mask in pool.map(lambda row: _window(root, row, shape), rows[:MEAN_CLIPS]):
            total += video[mask].sum(axis=0)
            count += int(mask.sum())
    return total / count


def filled(video: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None], colour.astype(np.float32), video)


@torch.no_grad()
def vae_round_trip(vae, video: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) in [0, 1] through encode (mode) and decode, as models.pipeline does."""
    x = torch.from_numpy(video).permute(3, 0, 1, 2)[None].to(vae.device, vae.dtype) * 2 - 1
    decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((decoded[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()


def load_vae(folder: Path):
    """An AutoencoderKLWan from a VAE folder, or from a base model folder's vae/."""
    from diffusers import AutoencoderKLWan

    subfolder = "vae" if (folder / "vae").is_dir() else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoencoderKLWan.from_pretrained(folder, subfolder=subfolder, torch_dtype=torch.float32).to(device).eval()


def _summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), **{f"q{int(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES}}


def measure_brackets(
    dataset: Path,
    frames: int = 17,
    stride: int = 2,
    height: int = 128,
    width: int = 192,
    vae_folder: Path | None = None,
    split: str = "test",
) -> dict:
    """Per-clip mask-region PSNR of the brackets on `split`, their summaries and the gate's verdict."""
    root = DatasetRoot(Path(dataset).resolve())
    rows = root.read_manifest("dataset").to_pylist()
    shape = dict(frames=frames, stride=stride, height=height, width=width)
    mean_colour = dataset_mean_colour(root, [r for r in rows if r["split"] == "train"], shape)
    vae = load_vae(Path(vae_folder)) if vae_folder is not None else None
    clips = {}
    for row in (r for r in rows if r["split"] == split):
        video, mask = _window(root, row, shape)
        scores = {
            "photo_mean": psnr(filled(video, mask, photo_mean_colour(root, row["product_images"])), video, mask),
            "dataset_mean": psnr(filled(video, mask, mean_colour), video, mask),
        }
        if vae is not None:
            scores["vae"] = psnr(vae_round_trip(vae, video), video, mask)
        clips[row["clip_key"]] = scores
    names = list(next(iter(clips.values())))
    summary = {name: _summary([c[name] for c in clips.values()]) for name in names}
    summary["photo_minus_dataset"] = _summary([c["photo_mean"] - c["dataset_mean"] for c in clips.values()])
    margin = summary["photo_mean"]["mean"] - summary["dataset_mean"]["mean"]
    return {
        "dataset": str(root.root),
        "split": split,
        "clips": len(clips),
        "window": shape,
        "dataset_mean_colour": [round(float(c) * 255, 1) for c in mean_colour],
        "summary": summary,
        "gate_db": GATE_DB,
        "margin_db": margin,
        "passed": bool(margin >= GATE_DB),
        "per_clip": clips,
    }


def format_table(result: dict) -> str:
    columns = ["mean", *(f"q{int(q * 100)}" for q in QUANTILES)]
    lines = [
        f"mask-region PSNR (dB) on {result['clips']} {result['split']} clips, window {result['window']}",
        f"{'bracket':<22}" + "".join(f"{c:>8}" for c in columns),
    ]
    for name, stats in result["summary"].items():
        lines.append(f"{name:<22}" + "".join(f"{stats[c]:8.2f}" for c in columns))
    verdict = "PASS" if result["passed"] else "FAIL"
    lines.append(
        f"{verdict}: photo_mean beats dataset_mean by {result['margin_db']:.2f} dB "
        f"(gate: >= {result['gate_db']:.0f} dB)"
    )
    return "\n".join(lines)


def run_brackets(dataset: Path, vae_folder: Path | None, frames: int, stride: int, out: Path | None) -> dict:
    result = measure_brackets(dataset, frames, stride, vae_folder=vae_folder)
    print(format_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result
