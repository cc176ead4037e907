"""What the fast generation path costs in quality, on the trained PoC model (docs/performance.md).

Every test clip is generated on the exact plain path (every step, eager, PyTorch's attention
order), then on the fast path (cuDNN attention first, compiled blocks) without and with the step
cache at each threshold, same seed, 50 steps, guidance on (text 5, product 3: three branches).
Per path: mask-region PSNR against the real clip (the evaluate flow's primary metric) and its
change from the exact path, mask-region PSNR against the exact output, the fraction of steps
that ran every block, and seconds per clip.

    python -m experiments.poc step-cache --model models:/product-video-generator-poc/1 --out $OUT
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.hooks import FirstBlockCacheConfig

from flows.generate import open_model
from models import metrics
from models.speed import FullStepCounter, apply_generation_speed
from tasks.training.evaluate import generate_clip, load_clip, split_rows


def mask_psnr_of_mean_error(
    generated: list[np.ndarray], references: list[np.ndarray], masks: list[np.ndarray]
) -> float:
    """PSNR of the mean squared error inside the masks over all clips (finite when outputs match
    in places: a per-clip PSNR of identical outputs would be infinite)."""
    errors = [float(((g - r) ** 2)[m.astype(bool)].mean()) for g, r, m in zip(generated, references, masks)]
    mse = float(np.mean(errors))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def measure_step_cache(
    model: str,
    thresholds: list[float],
    out: Path,
    split: str = "test",
    steps: int = 50,
    max_clips: int | None = None,
    device: str = "cuda",
) -> dict:
    # open_model looks URIs up in the project's MLflow store, as `flows.generate` does.
    pipe, run_config = open_model(model, device, plain=True)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    root = str(Path(run_config.data.root).resolve())
    settings = run_config.evaluate.model_copy(
        update={"num_inference_steps": steps, "text_guidance_scale": 5.0, "product_guidance_scale": 3.0}
    )
    clips = [load_clip(root, row, run_config.data) for row in split_rows(root, split, max_clips)]
    masks = [clip.masks for clip in clips]
    real = [clip.video for clip in clips]

    def run(label: str, sampler, cached: bool = False) -> tuple[dict, list[np.ndarray]]:
        counter = FullStepCounter(pipe.transformer) if cached else None
        generate_clip(pipe, clips[0], settings, sampler)  # warm-up: compilation stays out of the time
        if counter:
            counter.count = 0
        sync()
        started = time.perf_counter()
        outputs = [generate_clip(pipe, clip, settings, sampler) for clip in clips]
        sync()
        seconds = (time.perf_counter() - started) / len(clips)
        psnr = float(np.mean([metrics.psnr(g, r, m) for g, r, m in zip(outputs, real, masks)]))
        row = {
            "path": label,
            "clips": len(clips),
            "psnr_mask_vs_real": round(psnr, 3),
            "full_step_fraction": round(counter.count / (steps * len(clips)), 3) if counter else 1.0,
            "seconds_per_clip": round(seconds, 3),
        }
        print(json.dumps(row), flush=True)
        return row, outputs

    plain = run_config.model.sampler
    exact_row, exact = run("exact (plain path)", plain)
    fast = plain.model_copy(update={"attention": "cudnn"})
    apply_generation_speed(pipe.transformer, compile_blocks=True, step_cache_threshold=None, device=device)
    rows = [exact_row]
    for threshold in [None, *thresholds]:
        if threshold is not None:
            pipe.transformer.wan.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        row, outputs = run(
            "cudnn + compile" + (f" + step cache {threshold}" if threshold else ""), fast, cached=threshold is not None
        )
        row["psnr_mask_change_db"] = round(row["psnr_mask_vs_real"] - exact_row["psnr_mask_vs_real"], 3)
        row["psnr_mask_vs_exact"] = round(mask_psnr_of_mean_error(outputs, exact, masks), 2)
        row["speedup_vs_exact"] = round(exact_row["seconds_per_clip"] / row["seconds_per_clip"], 2)
        rows.append(row)
        if threshold is not None:
            pipe.transformer.wan.disable_cache()
    result = {
        "model": model,
        "split": split,
        "steps": steps,
        "guidance": [5.0, 3.0],
        "rows": rows,
        "device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu",
        "torch": torch.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        "\n| path | mask PSNR vs real (dB) | change (dB) | mask PSNR vs exact (dB) | full steps | s/clip | speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['path']} | {row['psnr_mask_vs_real']} | {row.get('psnr_mask_change_db', '')} | "
            f"{row.get('psnr_mask_vs_exact', '')} | {row['full_step_fraction']} | {row['seconds_per_clip']} | "
            f"{row.get('speedup_vs_exact', '')} |"
        )
    return result
