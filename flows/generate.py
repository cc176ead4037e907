"""generate: masked video (or video) + masks + 1-5 product photos (+ caption) -> mp4.

```
python -m flows.generate --masked-video clip_masked.mp4 --masks masks/ --images front.png side.png \
    --caption "a red bottle on a table" --steps 50 --seed 0 --output out.mp4
```

Inputs: `--masked-video` (the product region blanked) or `--video` (the clip itself; the region
under the masks is blanked here), and `--masks`: a folder of one PNG per frame (sorted by name,
white = put the product here) or a mask video. Frames must number 4k+1 (Wan's VAE folds 4 frames
per latent frame; `--trim` keeps the first 4k+1) and height / width must be multiples of 16.
Pixels outside the mask are the input's, bit for bit before H.264 encoding (the pipeline
composites). The model: a registry alias (`models:/product-video-generator@champion` by
default), a local model folder (`--checkpoint`), or `base:<run config>`, the untrained model of a
config (`--model base:configs/vace-1.3b.yaml` is zero-shot Wan2.1-VACE). An existing output is never overwritten
without `--overwrite`; the mp4 appears complete or not at all.

Every step is computed (exact) by default. `--fast` uses the step cache the model's registry
version carries from the evaluate flow's `--calibrate` (tasks/training/calibration.py: the
largest threshold that kept its mask PSNR within 0.3 dB of exact, and the speed-up measured);
a model without one is an error, exit status 2, saying so in one sentence: --fast never runs
something other than what was calibrated, and never silently exact. `--guidance-interval LOW
HIGH` and `--joint-guidance SCALE` are the sampler's cheaper guidance (models/pipeline.py).

The same as a Prefect flow: `generate(...)` (deployment `generate/default`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from models.config import SamplerConfig
from models.device import resolve_device
from models.pipeline import ProductVideoPipeline
from models.speed import StepCache
from models.transformer import SPATIAL_FACTOR, TEMPORAL_FACTOR
from storage import tracking
from storage.images import ImageError, load_mask_png, load_photo_rgba
from storage.layout import DatasetRoot
from storage.video import VideoError, probe, read_video, write_video
from tasks.training.calibration import CalibrationMissing, calibrated_step_cache
from tasks.training.model_store import IncompatibleCheckpointError, load_pipeline
from tasks.training.run_config import RunConfig

MAX_IMAGES = 5
SIZE_MULTIPLE = SPATIAL_FACTOR * 2  # VAE 8x, then the DiT's 2x2 patches


class GenerateInputError(ValueError):
    """The inputs cannot be generated from as given; the message says what to change."""


@dataclass(frozen=True)
class GenerateInputs:
    """What the pipeline takes: the blanked clip (T, H, W, 3) float in [0, 1], masks (T, H, W)
    bool, product photos as RGBA uint8 arrays (opaque where a photo has no alpha), and the clip's frame rate."""

    blanked: np.ndarray
    masks: np.ndarray
    photos: list[np.ndarray]
    fps: float


def nearest_valid_frames(count: int) -> tuple[int, int]:
    """The 4k+1 frame counts just below (at least 1) and above `count`."""
    below = max(1, (count - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1)
    return below, below + TEMPORAL_FACTOR


def read_masks(path: str | Path) -> np.ndarray:
    """(T, H, W) bool masks from a folder of per-frame PNGs (sorted by name) or a mask video."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        if not files:
            raise GenerateInputError(f"mask folder {path} holds no PNG files (one mask PNG per frame expected)")
        return np.stack([load_mask_png(f) for f in files])
    if path.is_file():
        return read_video(path).mean(axis=-1) > 127
    raise GenerateInputError(f"masks {path} not found: pass a folder of per-frame PNGs or a mask video")


def load_inputs(
    masks: str | Path,
    images: list[str],
    masked_video: str | Path | None = None,
    video: str | Path | None = None,
    trim: bool = False,
    max_images: int = MAX_IMAGES,
) -> GenerateInputs:
    """Read and check everything before a model is loaded; each problem is a GenerateInputError."""
    if (masked_video is None) == (video is None):
        raise GenerateInputError("pass exactly one of --masked-video (product region blanked) or --video")
    if not 1 <= len(images) <= max_images:
        raise GenerateInputError(f"got {len(images)} product images; pass 1 to {max_images} photos of the product")
    clip_path = Path(masked_video if masked_video is not None else video)
    try:
        frames = read_video(clip_path)
        fps = probe(clip_path).fps
        photos = [load_photo_rgba(p) for p in images]
    except (VideoError, ImageError, FileNotFoundError) as error:
        raise GenerateInputError(f"cannot read the inputs: {error}") from error
    mask = read_masks(masks)

    count, height, width = frames.shape[:3]
    if trim:
        count = nearest_valid_frames(min(count, len(mask)))[0]
        frames, mask = frames[:count], mask[:count]
    if len(mask) != len(frames):
        raise GenerateInputError(
            f"{clip_path.name} has {len(frames)} frames but there are {len(mask)} masks: give one mask per frame"
        )
    if mask.shape[1:] != (height, width):
        raise GenerateInputError(
            f"masks are {mask.shape[2]}x{mask.shape[1]} but the video is {width}x{height}: "
            "masks must have the video's size"
        )
    if (count - 1) % TEMPORAL_FACTOR:
        below, above = nearest_valid_frames(count)
        raise GenerateInputError(
            f"{clip_path.name} has {count} frames; the model needs 4k+1 frames (nearest: "
            f"{below} or {above}): cut the clip, or pass --trim to use the first {below}"
        )
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise GenerateInputError(
            f"{clip_path.name} is {width}x{height}; width and height must be multiples "
            f"of {SIZE_MULTIPLE} (e.g. {width // SIZE_MULTIPLE * SIZE_MULTIPLE}x"
            f"{height // SIZE_MULTIPLE * SIZE_MULTIPLE}): resize or crop the clip and masks"
        )
    if not mask.any():
        raise GenerateInputError("the masks are empty: mark where the product goes (white pixels)")
    # A masked video is blanked again too: H.264 can leak product colour into the zeroed region.
    blanked = frames.astype(np.float32) / 255.0 * ~mask[..., None]
    return GenerateInputs(blanked=blanked, masks=mask, photos=photos, fps=fps)


def use_mlflow(data_dir: str | Path = "data") -> None:
    """Look model URIs up in MLFLOW_TRACKING_URI, else the local store under data_dir."""
    uri = tracking.tracking_uri(data_dir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def open_model(
    model: str,
    device: str,
    data_dir: str | Path = "data",
    plain: bool = False,
    step_cache: StepCache | None = None,
    steps: int | None = None,
) -> tuple[ProductVideoPipeline, RunConfig]:
    """(pipeline on `device`, the run config it was trained with) of a registry URI, runs:/ URI
    or local model folder; `plain` swaps the config's sampler speed settings for diffusers' plain
    path (SamplerConfig.plain); `step_cache` (a calibrated one) skips steps in calls of `steps`
    steps (default the config's). URIs are looked up in MLflow (MLFLOW_TRACKING_URI, else the
    local store under data_dir)."""
    use_mlflow(data_dir)
    return load_pipeline(model, device=resolve_device(device), plain=plain, step_cache=step_cache, steps=steps)


def check_output(output: str | Path, overwrite: bool) -> Path:
    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise GenerateInputError(f"--output {output} must be an .mp4 file")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists: choose another --output or pass --overwrite")
    return output


def generate_video(
    pipe: ProductVideoPipeline,
    sampler: SamplerConfig,
    inputs: GenerateInputs,
    output: str | Path,
    caption: str = "",
    steps: int | None = None,
    text_guidance: float | None = None,
    product_guidance: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    callback: Callable[[int, int], None] | None = None,
) -> Path:
    """Generate and write the mp4 atomically. Steps, guidance scales (and the guidance interval
    or joint branch), negative prompt and feathering default to `sampler` (the model config's)."""
    output = check_output(output, overwrite)
    if len(inputs.photos) > pipe.config.max_product_images:
        raise GenerateInputError(
            f"got {len(inputs.photos)} product images; this model takes at most {pipe.config.max_product_images}"
        )
    device = pipe._execution_device
    mask = torch.from_numpy(inputs.masks.astype(np.float32))[None, None]
    blanked = torch.from_numpy(inputs.blanked).permute(3, 0, 1, 2)[None]
    video = pipe(
        blanked,
        mask,
        [inputs.photos],
        caption,
        negative_prompt=sampler.negative_prompt,
        num_inference_steps=steps or sampler.num_inference_steps,
        text_guidance_scale=sampler.text_guidance_scale if text_guidance is None else text_guidance,
        product_guidance_scale=(sampler.product_guidance_scale if product_guidance is None else product_guidance),
        generator=torch.Generator(device=device).manual_seed(seed),
        feather_px=sampler.feather_px,
        output_type="np",
        callback=callback,
        attention_backend=sampler.attention,
        **sampler.guidance_options(),
    )[0]
    with DatasetRoot.create(output.parent).atomic_file(output.name) as tmp:
        write_video(tmp, video, fps=inputs.fps)
    return output


def run_generate(
    masks: str,
    images: list[str],
    output: str,
    masked_video: str | None = None,
    video: str | None = None,
    caption: str = "",
    model: str = tracking.DEFAULT_MODEL_URI,
    checkpoint: str | None = None,
    steps: int | None = None,
    text_guidance: float | None = None,
    product_guidance: float | None = None,
    seed: int = 0,
    trim: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    data_dir: str = "data",
    plain: bool = False,
    callback: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
    fast: bool = False,
    guidance_interval: tuple[float, float] | None = None,
    joint_guidance: float | None = None,
) -> Path:
    """Check the output and inputs first (cheap), then the calibration `fast` needs, then load the
    model and generate. guidance_interval / joint_guidance override the model config's sampler."""
    if fast and plain:
        raise GenerateInputError("--fast and --plain contradict each other: choose one")
    check_output(output, overwrite)
    inputs = load_inputs(masks, images, masked_video=masked_video, video=video, trim=trim)
    source = checkpoint or model
    step_cache = None
    if fast:
        use_mlflow(data_dir)
        step_cache, record = calibrated_step_cache(source)  # CalibrationMissing: one sentence
        log(
            f"--fast: {step_cache.describe()}, measured {record['speedup']}x faster than exact with the mask "
            f"PSNR {record['psnr_mask_change_db']:+.3f} dB from exact"
        )
    log(
        f"{len(inputs.masks)} frames {inputs.masks.shape[2]}x{inputs.masks.shape[1]}, "
        f"{len(inputs.photos)} product images; loading {source}"
    )
    pipe, run_config = open_model(source, device, data_dir, plain, step_cache, steps)
    sampler = run_config.model.sampler
    overrides = {"guidance_interval": guidance_interval, "joint_guidance_scale": joint_guidance}
    sampler = sampler.model_copy(update={key: value for key, value in overrides.items() if value is not None})
    if step_cache is not None and sampler.guidance_interval is not None:
        raise GenerateInputError("--fast's step cache and a guidance interval cannot be combined: drop one")
    if step_cache is not None and (steps or sampler.num_inference_steps) != step_cache.steps:
        log(
            f"--fast: calibrated at {step_cache.steps} steps, generating {steps or sampler.num_inference_steps}: "
            "the quality at this step count was not measured"
        )
    return generate_video(
        pipe,
        sampler,
        inputs,
        output,
        caption,
        steps,
        text_guidance,
        product_guidance,
        seed,
        overwrite,
        callback,
    )


@flow(name="generate", log_prints=True)
def generate(
    masks: str,
    images: list[str],
    output: str,
    masked_video: str | None = None,
    video: str | None = None,
    caption: str = "",
    model: str = tracking.DEFAULT_MODEL_URI,
    checkpoint: str | None = None,
    steps: int | None = None,
    text_guidance: float | None = None,
    product_guidance: float | None = None,
    seed: int = 0,
    trim: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    data_dir: str = "data",
    plain: bool = False,
    fast: bool = False,
) -> str:
    """Generate one product video (see the module doc); progress shows as a Prefect artifact.
    plain: diffusers' plain path instead of the model config's speed settings (docs/performance.md);
    fast: the step cache the model's registry version was calibrated for (none: an error)."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key="generate-progress", description="sampler steps done")

    def step_done(step: int, total: int) -> None:
        update_progress_artifact(progress, 100.0 * step / total)

    written = run_generate(
        masks,
        images,
        output,
        masked_video,
        video,
        caption,
        model,
        checkpoint,
        steps,
        text_guidance,
        product_guidance,
        seed,
        trim,
        overwrite,
        device,
        data_dir,
        plain,
        callback=step_done,
        log=logger.info,
        fast=fast,
    )
    create_markdown_artifact(
        f"Generated `{written.resolve()}` from `{checkpoint or model}` (seed {seed}, caption {caption!r}).",
        key="generate-output",
    )
    return str(written)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Put a product into a masked video (writes an mp4).")
    clip = parser.add_mutually_exclusive_group(required=True)
    clip.add_argument("--masked-video", help="the clip with the product region blanked")
    clip.add_argument("--video", help="the clip itself; the region under --masks is blanked")
    parser.add_argument("--masks", required=True, help="folder of one mask PNG per frame, or a mask video")
    parser.add_argument("--images", nargs="+", default=[], help=f"1-{MAX_IMAGES} product photos")
    parser.add_argument("--caption", default="", help="text prompt describing the product / shot")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        default=tracking.DEFAULT_MODEL_URI,
        help="models:/... or runs:/... URI, or base:<run config> (its untrained model: zero-shot VACE)",
    )
    source.add_argument("--checkpoint", help="a local model folder (as the train flow saves)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model config's)")
    parser.add_argument("--text-guidance", type=float, help="text guidance scale (default: the model config's)")
    parser.add_argument("--product-guidance", type=float, help="product guidance scale (default: the model config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="the mp4 to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--trim", action="store_true", help="use the first 4k+1 frames")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--data-dir", default="data", help="where the local MLflow store lives")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="diffusers' plain path: no compilation, PyTorch's attention order",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="skip steps with the step cache the model was calibrated for (python -m flows.evaluate "
        "--calibrate records it on its registry version); without one: an error, exit status 2",
    )
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="guide only the steps whose noise level sigma (1 = pure noise) is in [LOW, HIGH]",
    )
    parser.add_argument(
        "--joint-guidance",
        type=float,
        metavar="SCALE",
        help="one branch with text and product dropped together, at this scale (2 branches, not 3)",
    )
    args = parser.parse_args(argv)
    from tqdm import tqdm

    with tqdm(desc="sampling", unit="step") as bar:

        def step_done(step: int, total: int) -> None:
            bar.total = total
            bar.update(step - bar.n)

        try:
            written = run_generate(
                args.masks,
                args.images,
                args.output,
                args.masked_video,
                args.video,
                args.caption,
                args.model,
                args.checkpoint,
                args.steps,
                args.text_guidance,
                args.product_guidance,
                args.seed,
                args.trim,
                args.overwrite,
                args.device,
                args.data_dir,
                args.plain,
                callback=step_done,
                log=tqdm.write,
                fast=args.fast,
                guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval),
                joint_guidance=args.joint_guidance,
            )
        except (
            GenerateInputError,
            FileExistsError,
            tracking.ModelNotFoundError,
            IncompatibleCheckpointError,
            CalibrationMissing,
        ) as error:
            parser.exit(2, f"error: {error}\n")
    print(f"wrote {written.resolve()}")
    return written


if __name__ == "__main__":
    main()
