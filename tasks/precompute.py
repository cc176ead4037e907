"""Precompute: each dataset clip -> the tensors training reads, so training never runs the VAE,
the text encoder or the image encoder.

Per clip (one cached task, keyed by the clip / mask / photo content hashes and the encoder +
sample-shape spec), under the dataset root:

```
latents/{signature}/{clip_key}.safetensors
    latents          (16, T', h, w)  Wan-normalised VAE latents of the clip window
    masked_latents   (16, T', h, w)  of clip * (1 - mask), computed here from clip + mask (the
                                     H.264 masked video can leak product colour, DESIGN.md)
    packed_mask      (4, T', h, w)   models.transformer.pack_mask (Wan I2V temporal fold)
    text_embeds      (L, D_text)     UMT5 embedding of the caption, zero-padded to L
    image_tokens     (N, L_img, D)   CLIP tokens of the first N product photos (RGBA composited on white)
manifests/latents.parquet            one row per clip and signature (storage.schemas.LATENTS)
```

The sample window (documented choice): `data.frames` frames from the clip's first frame, every
`data.frame_stride`-th, resized to cover data.height x data.width and centre-cropped
(storage.video.fit_crop, as the scenes stage crops); a clip too short for the window is set
aside with a reason. `signature` names the encoders and the sample shape, so two configs that
encode differently keep separate folders and a shared dataset never mixes them.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from prefect import get_run_logger
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from models.config import ModelConfig
from models.pipeline import encode_text, encode_video
from models.product_encoder import encode_product_images
from models.transformer import pack_mask
from storage.hashing import sha256_file, sha256_json
from storage.images import load_mask_png, load_photo
from storage.layout import DatasetRoot
from storage.rejects import RejectError, reject_row
from storage.video import fit_crop, read_video
from tasks.model_store import resolve_model_config
from tasks.run_config import RunConfig
from tasks.stage import StageResult, SystemicError, cache_storage, stage_task

STAGE = "precompute"
STAGE_VERSION = "1"
LATENT_KEYS = ("latents", "masked_latents", "packed_mask", "text_embeds", "image_tokens")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LatentSpec(BaseModel):
    """Everything a clip's tensors depend on besides its own files (the task's config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str  # VAE, UMT5 and tokenizer come from here
    image_encoder: str
    image_encoder_subfolder: str | None
    image_processor_subfolder: str | None
    text_max_length: int
    frames: int
    frame_stride: int
    height: int
    width: int
    max_product_images: int
    dtype: str
    device: str
    data_dir: str  # where `base_model: tiny` components live

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> "LatentSpec":
        model, data = cfg.model, cfg.data
        return cls(base_model=model.base_model, image_encoder=model.image_encoder,
                   image_encoder_subfolder=model.image_encoder_subfolder,
                   image_processor_subfolder=model.image_processor_subfolder,
                   text_max_length=model.text_max_length, frames=data.frames, frame_stride=data.frame_stride,
                   height=data.height, width=data.width, max_product_images=data.max_product_images,
                   dtype=cfg.precompute.dtype, device=cfg.precompute.device, data_dir=cfg.mlflow.data_dir)

    @property
    def signature(self) -> str:
        """Short hash of what changes the stored numbers (not where encoders run or live)."""
        return sha256_json(self.model_dump(exclude={"device", "data_dir"}) | {"version": STAGE_VERSION})[:16]


def latents_rel(signature: str, key: str) -> str:
    return f"latents/{signature}/{key}.safetensors"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Encoders:
    """The frozen encoders of a spec: VAE (float32), UMT5 + tokenizer, CLIP vision tower."""

    def __init__(self, spec: LatentSpec):
        cfg = resolve_model_config(ModelConfig(base_model=spec.base_model, image_encoder=spec.image_encoder,
                                               image_encoder_subfolder=spec.image_encoder_subfolder,
                                               image_processor_subfolder=spec.image_processor_subfolder),
                                   spec.data_dir)
        self.device, dtype = resolve_device(spec.device), DTYPES[spec.dtype]
        try:
            self.vae = AutoencoderKLWan.from_pretrained(cfg.base_model, subfolder="vae",
                                                        torch_dtype=torch.float32).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.base_model, subfolder="tokenizer")
            self.text_encoder = UMT5EncoderModel.from_pretrained(cfg.base_model, subfolder="text_encoder",
                                                                 dtype=dtype).to(self.device).eval()
            self.image_encoder = CLIPVisionModel.from_pretrained(
                cfg.image_encoder, subfolder=cfg.image_encoder_subfolder, dtype=dtype).to(self.device).eval()
            self.image_processor = CLIPImageProcessor.from_pretrained(cfg.image_encoder,
                                                                      subfolder=cfg.image_processor_subfolder)
        except (OSError, ValueError) as error:
            raise SystemicError(f"cannot load the frozen encoders of {cfg.base_model} / {cfg.image_encoder}: "
                                f"{error}. Download the weights (huggingface-cli download ...) or fix "
                                "model.base_model / model.image_encoder in the run config") from error


@functools.cache
def _encoders(spec: LatentSpec) -> Encoders:
    """One set of encoders per spec and process (tasks of one run share them)."""
    return Encoders(spec)


def window_indices(num_frames: int, frames: int, stride: int) -> list[int]:
    """The documented sample window: `frames` frames from the first, every `stride`-th."""
    needed = (frames - 1) * stride + 1
    if num_frames < needed:
        raise RejectError("clip_too_short", f"clip has {num_frames} frames; the sample window needs {needed} "
                                            f"({frames} frames every {stride})")
    return list(range(0, needed, stride))


def load_clip_window(root: DatasetRoot, video_path: str, mask_dir: str, frames: int, stride: int,
                     height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(video (3, T, H, W) float in [0, 1], mask (1, T, H, W) float in {0, 1}) of a dataset clip's
    sample window, from the clip and its mask PNGs (not the masked video)."""
    clip = read_video(root.path(video_path))
    mask_files = sorted(root.path(mask_dir).glob("*.png"))
    if len(mask_files) != len(clip):
        raise RejectError("mask_frame_mismatch", f"{len(mask_files)} mask PNGs for {len(clip)} video frames")
    indices = window_indices(len(clip), frames, stride)
    video = np.stack([fit_crop(clip[i], height, width) for i in indices])
    masks = np.stack([fit_crop(load_mask_png(mask_files[i]).astype(np.uint8) * 255, height, width) > 127
                      for i in indices])
    video_t = torch.from_numpy(video).permute(3, 0, 1, 2).float() / 255
    mask_t = torch.from_numpy(masks).unsqueeze(0).float()
    return video_t, mask_t


def load_product_photos(root: DatasetRoot, image_paths: list[str], max_images: int) -> list[np.ndarray]:
    """The first `max_images` product photos as H x W x 3 uint8, transparent parts on white
    (the RGBA cut-outs of build-dataset; white is what product pages show)."""
    photos = []
    for rel in image_paths[:max_images]:
        rgb, alpha = load_photo(root.path(rel))
        if alpha is not None:
            a = alpha[..., None].astype(np.float32) / 255
            rgb = np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)
        photos.append(rgb)
    return photos


@torch.no_grad()
def encode_clip(item: dict, root: DatasetRoot, spec: LatentSpec) -> dict[str, torch.Tensor]:
    """The stored tensors of one clip (see the module docstring), on the CPU."""
    encoders = _encoders(spec)
    video, mask = load_clip_window(root, item["video_path"], item["mask_dir"], spec.frames, spec.frame_stride,
                                   spec.height, spec.width)
    both = torch.stack([video, video * (1 - mask)]).to(encoders.device)
    latents, masked_latents = encode_video(encoders.vae, both)
    packed = pack_mask(mask.unsqueeze(0).to(encoders.device), latents.shape[-2:])[0]
    text = encode_text(encoders.tokenizer, encoders.text_encoder, [item["caption"]], spec.text_max_length)[0]
    photos = load_product_photos(root, item["product_images"], spec.max_product_images)
    tokens, _ = encode_product_images(encoders.image_encoder, encoders.image_processor, [photos],
                                      spec.max_product_images)
    tensors = {"latents": latents, "masked_latents": masked_latents, "packed_mask": packed,
               "text_embeds": text, "image_tokens": tokens[0]}
    return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}


def precompute_clip(item: dict, root: str, spec: LatentSpec) -> StageResult:
    """One dataset row (+ its content hashes, which key the cache) -> its latents file and row."""
    dataset = DatasetRoot(Path(root))
    key = item["clip_key"]
    try:
        tensors = encode_clip(item, dataset, spec)
    except RejectError as error:
        return {"rows": [], "rejects": [reject_row(STAGE, key, error.code, str(error), item["product_id"],
                                                   item["clip_id"])]}
    rel = latents_rel(spec.signature, key)
    with dataset.atomic_file(rel) as tmp:
        save_file(tensors, str(tmp), metadata={"clip_key": key, "signature": spec.signature})
        digest, _ = sha256_file(tmp)
    row = {"clip_key": key, "product_id": item["product_id"], "clip_id": item["clip_id"], "split": item["split"],
           "category": item["category"], "signature": spec.signature, "path": rel,
           "shapes": json.dumps({name: list(value.shape) for name, value in tensors.items()}),
           "num_images": tensors["image_tokens"].shape[0], "sha256": digest}
    return {"rows": [row], "rejects": []}


precompute_clip_task = stage_task(STAGE, STAGE_VERSION)(precompute_clip)


def clip_items(root: DatasetRoot) -> list[dict]:
    """Dataset rows with the content hashes of their clip, masks and photos (the cache key)."""
    if not root.has_manifest("dataset"):
        raise FileNotFoundError(f"{root.root} has no manifests/dataset.parquet: run build-dataset first "
                                "(or point data.root at a built dataset)")
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


def precompute_latents(cfg: RunConfig) -> dict:
    """Run the cached per-clip task over the whole dataset (inside a flow) and write the latents
    manifest. A cached result whose file is gone or unreadable is recomputed. Returns
    {signature, rows, rejects, ran, cached}."""

    root = DatasetRoot.create(cfg.data.root)
    spec = LatentSpec.from_run_config(cfg)
    task = precompute_clip_task.with_options(result_storage=cache_storage(root))
    rows, rejects, work = [], [], {"ran": 0, "cached": 0}
    for item in clip_items(root):
        state = task(item=item, root=str(root.root), spec=spec, return_state=True)
        result, cached = state.result(), state.name == "Cached"
        if not all(_readable(root, row) for row in result["rows"]):
            result = task.with_options(refresh_cache=True)(item=item, root=str(root.root), spec=spec)
            cached = False
        work["cached" if cached else "ran"] += 1
        rows += result["rows"]
        rejects += result["rejects"]
    others = []  # rows of other signatures (other configs on the same dataset) stay
    if root.has_manifest("latents"):
        others = [row for row in root.read_manifest("latents").to_pylist() if row["signature"] != spec.signature]
    root.write_manifest("latents", others + rows)
    get_run_logger().info("precompute %s: %d clips encoded, %d from cache, %d set aside", spec.signature,
                          work["ran"], work["cached"], len(rejects))
    return {"signature": spec.signature, "rows": rows, "rejects": rejects, **work}


def _readable(root: DatasetRoot, row: dict) -> bool:
    try:
        check_latents(root, row)
    except LatentsError:
        return False
    return True


class LatentsError(RuntimeError):
    """Stored latents are missing or unreadable; the message names the file and what to do."""


def check_latents(root: DatasetRoot, row: dict) -> None:
    """The file of a manifest row exists and its header lists the recorded tensors and shapes."""
    path = root.path(row["path"])
    expected = json.loads(row["shapes"])
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:  # missing file, truncated header, not a safetensors file
        raise LatentsError(f"latents of clip {row['clip_key']} unreadable at {path} ({error}); re-run "
                           "precompute (the train flow does it first) to re-create them") from error
    if found != expected:
        raise LatentsError(f"latents of clip {row['clip_key']} at {path} hold {found}, the manifest says "
                           f"{expected}; re-run precompute to re-create them")


def load_latents(root: DatasetRoot, row: dict) -> dict[str, torch.Tensor]:
    """The tensors of one manifest row; a missing or corrupt file is a LatentsError."""
    path = root.path(row["path"])
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in LATENT_KEYS}
    except Exception as error:
        raise LatentsError(f"latents of clip {row['clip_key']} unreadable at {path} ({error}); re-run "
                           "precompute (the train flow does it first) to re-create them") from error
