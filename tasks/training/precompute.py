"""Precompute: each dataset product -> the tensors training reads, so training never runs the VAE,
the text encoder or the image encoder.

What is stored is the model specification's choice (models/spec.py, `encode_clip` and
`encode_product`); for the `product` backend (models/product_spec.py), under the dataset root:

```
latents/{signature}/{product_id}/photos.safetensors     once per product (its photos, first N)
    reference_latents (N, 16, h, w)  VAE latents of each photo on a grey canvas of the clip size
    image_tokens      (N, L_img, D)  CLIP tokens of each photo (cut-out on white)   (reference: clip, both)
latents/{signature}/{product_id}/{clip_key}-w{k}.safetensors     per clip and sample window k
    latents          (16, T', h, w)  Wan-normalised VAE latents of the window
    masked_latents   (16, T', h, w)  of the window with its masked region filled (model.masked_fill),
                                     computed here from clip + mask (the H.264 masked video can
                                     leak product colour: docs/data-pipeline.md, "Masked videos")
    packed_mask      (4, T', h, w)   models.transformer.pack_mask (Wan I2V temporal fold)
    text_embeds      (L, D_text)     UMT5 embedding of the prompt (data.prompt_from), zero-padded
manifests/latents.parquet            one row per clip window and signature (storage.schemas.LATENTS)
```

One cached Prefect task per product (keyed by the content hashes of its clips, masks and photos
and by the encoders + sample-shape spec): a new or changed product encodes only its own photos
and clips, and a dataset of thousands of clips is thousands of clip files but far fewer task runs.

Sample windows (documented choice): `data.frames` frames every `data.frame_stride`-th, resized to
cover data.height x data.width and centre-cropped (storage.video.fit_crop, as the scenes stage
crops); `data.windows_per_clip` windows spread evenly from the clip's first frame to its last
(one window: the clip's start), so the frames build-dataset segmented are frames trained on. A clip
too short for one window is set aside with a reason. `signature` names the encoders and the sample
shape, so two configs that encode differently keep separate folders and a shared dataset never
mixes them.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import save_file

from models.config import ModelConfig
from models.device import resolve_device
from models.spec import ModelSpecification, specification
from storage.errors import SystemicError
from storage.hashing import sha256_file, sha256_json
from storage.images import load_mask_png, load_photo_rgba
from storage.layout import DatasetRoot
from storage.rejects import RejectError, reject_row
from storage.video import fit_crop, read_video
from tasks.dataset.stage import StageResult, cache_storage, stage_task
from tasks.training.model_store import resolve_model_config
from tasks.training.run_config import RunConfig, prompt_of

STAGE = "precompute"
STAGE_VERSION = "2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LatentSpec(BaseModel):
    """Everything a clip's tensors depend on besides its own files (the task's config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str
    base_model: str  # VAE, UMT5 and tokenizer come from here
    reference: str
    masked_fill: str
    image_encoder: str | None
    image_encoder_subfolder: str | None
    image_processor_subfolder: str | None
    text_max_length: int
    prompt_from: str
    frames: int
    frame_stride: int
    windows_per_clip: int
    height: int
    width: int
    max_product_images: int
    dtype: str
    device: str
    data_dir: str  # where `base_model: tiny` components live

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> LatentSpec:
        model, data = cfg.model, cfg.data
        return cls(
            backend=model.backend,
            base_model=model.base_model,
            reference=model.reference,
            masked_fill=model.masked_fill,
            image_encoder=model.image_encoder,
            image_encoder_subfolder=model.image_encoder_subfolder,
            image_processor_subfolder=model.image_processor_subfolder,
            text_max_length=model.text_max_length,
            prompt_from=data.prompt_from,
            frames=data.frames,
            frame_stride=data.frame_stride,
            windows_per_clip=data.windows_per_clip,
            height=data.height,
            width=data.width,
            max_product_images=data.max_product_images,
            dtype=cfg.precompute.dtype,
            device=cfg.precompute.device,
            data_dir=cfg.mlflow.data_dir,
        )

    @property
    def signature(self) -> str:
        """Short hash of what changes the stored numbers (not where encoders run or live)."""
        return sha256_json(self.model_dump(exclude={"device", "data_dir"}) | {"version": STAGE_VERSION})[:16]

    def resolved_model(self) -> ModelConfig:
        """The (resolved) model config of these encoders: what models.spec.specification reads."""
        return resolve_model_config(
            ModelConfig(
                backend=self.backend,
                base_model=self.base_model,
                reference=self.reference,
                masked_fill=self.masked_fill,
                image_encoder=self.image_encoder,
                image_encoder_subfolder=self.image_encoder_subfolder,
                image_processor_subfolder=self.image_processor_subfolder,
                text_max_length=self.text_max_length,
            ),
            self.data_dir,
        )


def product_rel(signature: str, product_id: str) -> str:
    return f"latents/{signature}/{product_id}/photos.safetensors"


def window_rel(signature: str, product_id: str, clip_key: str, window: int) -> str:
    return f"latents/{signature}/{product_id}/{clip_key}-w{window}.safetensors"


@functools.cache
def _encoders(spec: LatentSpec) -> tuple[ModelSpecification, object, threading.Lock]:
    """(model specification, its frozen encoders, the lock that serialises their use): loaded once
    per spec and process, shared by the run's task threads (Wan's VAE keeps a feature cache on the
    module during an encode, so two threads must not encode at once)."""
    cfg = spec.resolved_model()
    model_spec = specification(cfg)
    try:
        return model_spec, model_spec.load_encoders(resolve_device(spec.device), DTYPES[spec.dtype]), threading.Lock()
    except (OSError, ValueError) as error:
        raise SystemicError(
            f"cannot load the frozen encoders of {cfg.base_model} / {cfg.image_encoder}: "
            f"{error}. Download the weights (huggingface-cli download ...) or fix "
            "model.base_model / model.image_encoder in the run config"
        ) from error


def release_encoders() -> None:
    """Drop the encoders and return their device memory: training runs next in the same process
    (the train flow), and on the PoC's GPU run a batch that fits alone ran out of memory after a
    precompute of 1,000 products had left its encoders and cached blocks behind (docs/poc.md)."""
    _encoders.cache_clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def window_starts(num_frames: int, frames: int, stride: int, count: int) -> list[int]:
    """First frames of up to `count` sample windows spread evenly over a clip (the documented
    choice: the first at frame 0, the last ending at the clip's end); too short a clip is a reject."""
    needed = (frames - 1) * stride + 1
    if num_frames < needed:
        raise RejectError(
            "clip_too_short",
            f"clip has {num_frames} frames; the sample window needs {needed} ({frames} frames every {stride})",
        )
    return sorted({round(start) for start in np.linspace(0, num_frames - needed, count)})


def load_clip_windows(
    root: DatasetRoot, video_path: str, mask_dir: str, frames: int, stride: int, height: int, width: int, count: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(video (3, T, H, W) float in [0, 1], mask (1, T, H, W) float in {0, 1})] of a dataset clip's
    sample windows (window_starts), from the clip and its mask PNGs (not the masked video)."""
    clip = read_video(root.path(video_path))
    mask_files = sorted(root.path(mask_dir).glob("*.png"))
    if len(mask_files) != len(clip):
        raise RejectError("mask_frame_mismatch", f"{len(mask_files)} mask PNGs for {len(clip)} video frames")
    windows = []
    for start in window_starts(len(clip), frames, stride, count):
        indices = range(start, start + (frames - 1) * stride + 1, stride)
        video = np.stack([fit_crop(clip[i], height, width) for i in indices])
        masks = np.stack(
            [fit_crop(load_mask_png(mask_files[i]).astype(np.uint8) * 255, height, width) > 127 for i in indices]
        )
        windows.append(
            (torch.from_numpy(video).permute(3, 0, 1, 2).float() / 255, torch.from_numpy(masks).unsqueeze(0).float())
        )
    return windows


def load_clip_window(
    root: DatasetRoot, video_path: str, mask_dir: str, frames: int, stride: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip's first sample window (what evaluation and sample videos show)."""
    return load_clip_windows(root, video_path, mask_dir, frames, stride, height, width)[0]


def load_product_photos(root: DatasetRoot, image_paths: list[str], max_images: int) -> list[np.ndarray]:
    """The first `max_images` product photos as H x W x 4 uint8 (build-dataset's RGBA cut-outs;
    a photo without alpha is opaque). The model specification decides what goes behind them."""
    return [load_photo_rgba(root.path(rel)) for rel in image_paths[:max_images]]


def _save(root: DatasetRoot, rel: str, tensors: dict[str, torch.Tensor], spec: LatentSpec) -> str:
    with root.atomic_file(rel) as tmp:
        save_file(
            {name: value.contiguous() for name, value in tensors.items()},
            str(tmp),
            metadata={"signature": spec.signature},
        )
        digest, _ = sha256_file(tmp)
    return digest


def _shapes(tensors: dict[str, torch.Tensor]) -> str:
    return json.dumps({name: list(value.shape) for name, value in tensors.items()})


def precompute_product(product: dict, root: str, spec: LatentSpec) -> StageResult:
    """One product (its dataset rows + their content hashes, which key the cache) -> its photo
    tensors, one file per clip window, and a manifest row per window; a bad clip is a reject."""
    dataset = DatasetRoot(Path(root))
    model_spec, encoders, encoding = _encoders(spec)
    pid = product["product_id"]
    photos = load_product_photos(dataset, product["product_images"], spec.max_product_images)
    with encoding:
        photo_tensors = model_spec.encode_product(encoders, photos, spec.height, spec.width)
    photo_rel = product_rel(spec.signature, pid)
    _save(dataset, photo_rel, photo_tensors, spec)
    rows, rejects = [], []
    for item in product["clips"]:
        try:
            windows = load_clip_windows(
                dataset,
                item["video_path"],
                item["mask_dir"],
                spec.frames,
                spec.frame_stride,
                spec.height,
                spec.width,
                spec.windows_per_clip,
            )
        except RejectError as error:
            rejects.append(reject_row(STAGE, item["clip_key"], error.code, str(error), pid, item["clip_id"]))
            continue
        for window, (video, mask) in enumerate(windows):
            with encoding:
                tensors = model_spec.encode_clip(encoders, video, mask, prompt_of(item, spec.prompt_from))
            rel = window_rel(spec.signature, pid, item["clip_key"], window)
            rows.append(
                {
                    "clip_key": item["clip_key"],
                    "window": window,
                    "product_id": pid,
                    "clip_id": item["clip_id"],
                    "split": item["split"],
                    "category": item["category"],
                    "signature": spec.signature,
                    "path": rel,
                    "shapes": _shapes(tensors),
                    "sha256": _save(dataset, rel, tensors, spec),
                    "product_path": photo_rel,
                    "product_shapes": _shapes(photo_tensors),
                    "num_images": len(photos),
                }
            )
    return {"rows": rows, "rejects": rejects}


precompute_product_task = stage_task(STAGE, STAGE_VERSION)(precompute_product)


def clip_items(root: DatasetRoot) -> list[dict]:
    """Dataset rows with the content hashes of their clip, masks and photos (the cache key)."""
    if not root.has_manifest("dataset"):
        raise FileNotFoundError(
            f"{root.root} has no manifests/dataset.parquet: run build-dataset first "
            "(or point data.root at a built dataset)"
        )
    clip_sha = dict(zip(*root.read_manifest("clips").select(["clip_key", "sha256"]).to_pydict().values()))
    mask_sha = dict(zip(*root.read_manifest("masks").select(["clip_key", "sha256"]).to_pydict().values()))
    image_sha = dict(zip(*root.read_manifest("product_images").select(["image_path", "sha256"]).to_pydict().values()))
    items = []
    for row in root.read_manifest("dataset").to_pylist():
        row["video_sha256"] = clip_sha[row["clip_key"]]
        row["masks_sha256"] = mask_sha[row["clip_key"]]
        row["image_sha256"] = [image_sha[path] for path in row["product_images"]]
        items.append(row)
    return items


def product_items(root: DatasetRoot) -> list[dict]:
    """clip_items grouped per product: {product_id, product_images, image_sha256, clips: [...]}."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for item in clip_items(root):
        grouped[item["product_id"]].append(item)
    return [
        {
            "product_id": pid,
            "product_images": clips[0]["product_images"],
            "image_sha256": clips[0]["image_sha256"],
            "clips": sorted(clips, key=lambda c: c["clip_key"]),
        }
        for pid, clips in sorted(grouped.items())
    ]


def precompute_latents(cfg: RunConfig) -> dict:
    """Run the cached per-product task over the whole dataset (inside a flow) and write the latents
    manifest. A cached result whose files are gone or unreadable is recomputed. Returns
    {signature, rows, rejects, ran, cached} (ran / cached count products)."""

    root = DatasetRoot.create(cfg.data.root)
    spec = LatentSpec.from_run_config(cfg)
    task = precompute_product_task.with_options(result_storage=cache_storage(root))
    products = product_items(root)
    _encoders(spec)  # load once, before the threads that share them start
    rows, rejects, work = [], [], {"ran": 0, "cached": 0}
    try:
        # Submitted, not called: the flow's thread pool overlaps one product's video and PNG decoding
        # with another's encoding (a product's own steps stay in order inside its task).
        futures = [task.submit(product=product, root=str(root.root), spec=spec) for product in products]
        for product, future in zip(products, futures):
            future.wait()
            result, cached = future.state.result(), future.state.name == "Cached"
            if not all(_readable(root, row) for row in result["rows"]):
                result = task.with_options(refresh_cache=True)(product=product, root=str(root.root), spec=spec)
                cached = False
            work["cached" if cached else "ran"] += 1
            rows += result["rows"]
            rejects += result["rejects"]
    finally:
        release_encoders()
    others = []  # rows of other signatures (other configs on the same dataset) stay
    if root.has_manifest("latents"):
        others = [row for row in root.read_manifest("latents").to_pylist() if row["signature"] != spec.signature]
    root.write_manifest("latents", others + rows)
    get_run_logger().info(
        "precompute %s: %d products encoded, %d from cache, %d clip windows, %d clips set aside",
        spec.signature,
        work["ran"],
        work["cached"],
        len(rows),
        len(rejects),
    )
    return {"signature": spec.signature, "rows": rows, "rejects": rejects, **work}


def _readable(root: DatasetRoot, row: dict) -> bool:
    try:
        check_latents(root, row)
    except LatentsError:
        return False
    return True


class LatentsError(RuntimeError):
    """Stored latents are missing or unreadable; the message names the file and what to do."""


def _header(root: DatasetRoot, row: dict, rel: str) -> dict[str, list[int]]:
    path = root.path(rel)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:  # missing file, truncated header, not a safetensors file
        raise LatentsError(
            f"latents of clip {row['clip_key']} unreadable at {path} ({error}); re-run "
            "precompute (the train flow does it first) to re-create them"
        ) from error


def check_latents(root: DatasetRoot, row: dict) -> None:
    """The files of a manifest row exist and their headers list the recorded tensors and shapes."""
    for rel, recorded in ((row["path"], row["shapes"]), (row["product_path"], row["product_shapes"])):
        found, expected = _header(root, row, rel), json.loads(recorded)
        if found != expected:
            raise LatentsError(
                f"latents of clip {row['clip_key']} at {root.path(rel)} hold {found}, the manifest "
                f"says {expected}; re-run precompute to re-create them"
            )


def load_latents(root: DatasetRoot, row: dict) -> dict[str, torch.Tensor]:
    """The tensors of one manifest row (its window's and its product's); a missing or corrupt
    file is a LatentsError."""
    tensors = {}
    for rel in (row["path"], row["product_path"]):
        try:
            with safe_open(str(root.path(rel)), framework="pt") as handle:
                tensors |= {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:
            raise LatentsError(
                f"latents of clip {row['clip_key']} unreadable at {root.path(rel)} ({error}); "
                "re-run precompute (the train flow does it first) to re-create them"
            ) from error
    return tensors
