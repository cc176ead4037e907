"""The PoC's data: a synthetic product studio at low resolution, through build-dataset.

Low resolution so that a small model trains from scratch in minutes on one GPU: showcase videos of
320 x 192 (portrait ones 192 x 320), clips normalised to 128 x 192 at 24 fps, photos cut out to
128 x 128. Everything else is the pipeline users run (classic segmentation and background
removal: the studio backdrop is clean), so the PoC also exercises build-dataset at scale.
"""
from __future__ import annotations

from pathlib import Path

from demo.studio import StudioConfig, generate_studio
from flows.build_dataset import build_dataset
from tasks.product_images import ImageConfig
from tasks.scenes import SceneConfig

STUDIO = dict(width=320, height=192, videos_per_product=(1, 1), shots_per_video=(2, 2), shot_seconds=(2.0, 3.0),
              images_per_product=(3, 5), image_size=192, portrait_fraction=0.1)
# Clips of 1.5-3 s: a training window is 17 frames at stride 2 (33 frames, 1.4 s).
SCENES = SceneConfig(height=128, width=192, min_short_side=None, detect_width=128, min_clip_s=1.5, max_clip_s=3.0,
                     min_scene_len=12)
IMAGES = ImageConfig(size=128)


def build_poc_dataset(folder: Path, products: int, seed: int = 0) -> dict:
    """<folder>/source (+ truth) from the studio, then <folder>/dataset; returns build-dataset's summary."""
    source, truth, dataset = folder / "source", folder / "truth", folder / "dataset"
    if not source.exists():
        generate_studio(source, truth, StudioConfig(num_products=products, seed=seed, **STUDIO))
    return build_dataset(source=str(source), output=str(dataset), segmenter="classic", background_removal="classic",
                         scenes=SCENES, images=IMAGES)
