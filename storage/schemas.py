"""The data contract between stages: one pyarrow schema per manifest.

Every stage reads the manifest of the stage before it and writes its own. A manifest row is the
unit of caching, retry and rejection. Paths in manifests are relative to the dataset root (OUT),
except source URIs, which point into the source tree.
"""

from __future__ import annotations

import pyarrow as pa

# Ingest: one row per product that passed validation.
PRODUCTS = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # text prompt for the product detector
        pa.field("num_videos", pa.int32(), nullable=False),
        pa.field("num_images", pa.int32(), nullable=False),
    ]
)

# Ingest: one row per input file of an accepted product, with its content hash.
SOURCE_FILES = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),  # "video" | "image" | "meta"
        pa.field("name", pa.string(), nullable=False),  # file name inside the product folder
        pa.field("uri", pa.string(), nullable=False),  # fsspec URI (or local path) of the file
        pa.field("size_bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)

# Scenes: one row per normalised clip (H x W, CFR) cut from a source video.
CLIPS = pa.schema(
    [
        pa.field("clip_key", pa.string(), nullable=False),  # "{product_id}_{clip_id}"
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_sha256", pa.string(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),  # in the source, presentation time
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("fps", pa.float64(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),  # video_clips/{clip_key}.mp4
        pa.field("sha256", pa.string(), nullable=False),  # of the clip file
    ]
)

# Segmentation: one row per clip whose masks passed quality control.
MASKS = pa.schema(
    [
        pa.field("clip_key", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("mask_dir", pa.string(), nullable=False),  # masks/{clip_key}/
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("segmenter", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("coverage_mean", pa.float64(), nullable=False),  # mask fraction of the frame
        pa.field("coverage_min", pa.float64(), nullable=False),
        pa.field("coverage_max", pa.float64(), nullable=False),
        pa.field("temporal_iou_min", pa.float64(), nullable=False),  # IoU of consecutive frames
        pa.field("sha256", pa.string(), nullable=False),  # over all mask PNGs, in frame order
    ]
)

# Masking: one row per masked video.
MASKED_VIDEOS = pa.schema(
    [
        pa.field("clip_key", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("masked_video_path", pa.string(), nullable=False),
        pa.field("fill", pa.string(), nullable=False),  # "zero" | "noise"
        # Product colour that survives H.264 inside the masked region, on 0..255 after decoding:
        # mean absolute difference from the fill, and its 99th percentile.
        pa.field("leakage_mean", pa.float64(), nullable=False),
        pa.field("leakage_p99", pa.float64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)

# Product images: one row per kept view (3-5 per accepted product).
PRODUCT_IMAGES = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("view", pa.string(), nullable=False),  # file stem, e.g. "front"
        pa.field("image_path", pa.string(), nullable=False),  # product_images/{product_id}/{view}.png
        pa.field("source_name", pa.string(), nullable=False),
        pa.field("source_sha256", pa.string(), nullable=False),
        pa.field("background_removal", pa.string(), nullable=False),
        pa.field("foreground_fraction", pa.float64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)

# Assembly: one row per clip in the final dataset, with its split.
DATASET = pa.schema(
    [
        pa.field("clip_key", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "train" | "val" | "test"
        pa.field("category", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("masked_video_path", pa.string(), nullable=False),
        pa.field("mask_dir", pa.string(), nullable=False),
        pa.field("product_images", pa.list_(pa.string()), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("fps", pa.float64(), nullable=False),
    ]
)

# Precompute: one row per clip sample window whose training tensors are stored (tasks/training/precompute.py).
LATENTS = pa.schema(
    [
        pa.field("clip_key", pa.string(), nullable=False),
        pa.field("window", pa.int32(), nullable=False),  # sample window of the clip, 0 = from its first frame
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("signature", pa.string(), nullable=False),  # encoders + sample shape the tensors come from
        pa.field(
            "path", pa.string(), nullable=False
        ),  # latents/{signature}/{product_id}/{clip_key}-w{window}.safetensors
        pa.field("shapes", pa.string(), nullable=False),  # JSON {tensor name: shape}
        pa.field("sha256", pa.string(), nullable=False),  # of the window's safetensors file
        pa.field("product_path", pa.string(), nullable=False),  # latents/{signature}/{product_id}/photos.safetensors
        pa.field("product_shapes", pa.string(), nullable=False),  # JSON {tensor name: shape}, photos first
        pa.field("num_images", pa.int32(), nullable=False),  # product photos encoded
    ]
)

# Everything a stage set aside, with a stable code and a sentence for humans.
REJECTS = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=True),
        pa.field("clip_id", pa.string(), nullable=True),
        pa.field("item", pa.string(), nullable=False),  # what was rejected: a URI, a clip key...
        pa.field("reason_code", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

MANIFESTS: dict[str, pa.Schema] = {
    "products": PRODUCTS,
    "source_files": SOURCE_FILES,
    "clips": CLIPS,
    "masks": MASKS,
    "masked_videos": MASKED_VIDEOS,
    "product_images": PRODUCT_IMAGES,
    "dataset": DATASET,
    "latents": LATENTS,
    "rejects": REJECTS,
}


def to_table(name: str, rows: list[dict]) -> pa.Table:
    """Rows -> a table of manifest `name`; raises if a row misses a field or has a wrong type."""
    schema = MANIFESTS[name]
    missing = [f.name for f in schema if not f.nullable and any(r.get(f.name) is None for r in rows)]
    if missing:
        raise ValueError(f"manifest {name!r}: rows lack required fields {sorted(set(missing))}")
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
