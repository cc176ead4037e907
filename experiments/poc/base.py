"""The PoC's base model folder, laid out like Wan-AI/Wan2.1-T2V-1.3B-Diffusers, so the project's
config, train and evaluate flows load it exactly as they load the real one.

- vae/: an AutoencoderKLWan trained here on the windows the DiT reads (data.frames frames every
  data.frame_stride-th; CROP-sized spatial crops for speed, the VAE is convolutional, each crop
  placed around the window's product, whose pixels weigh PRODUCT_WEIGHT more in the loss: the
  first GPU run trained on random crops with a uniform loss and reached 23 dB on whole windows
  but 14 dB inside the mask, docs/poc.md) and on the product photos on their grey canvas (one
  frame each, as reference latents are encoded). The
  pretrained Wan VAE cannot be downloaded, and no fixed map is invertible in Wan's latent layout
  (16 channels for 4 x 8 x 8 x 3 = 768 pixel values per latent cell), which the model code relies
  on. So a small Wan VAE (same class, narrower) learns this data; its latents_mean/std are
  measured on the train windows, as Wan's per-channel statistics are, so normalised latents are
  about N(0, 1). Gate 2 (issue 14): its round trip inside the mask of the test windows.
- transformer/: a small WanTransformer3DModel (same code as 1.3B, fewer and narrower layers),
  randomly initialised: the PoC trains it from scratch.
- text_encoder/, tokenizer/: the tiny random UMT5 of models/tiny.py (frozen, as UMT5-XXL is).
- image_encoder/, image_processor/: a small random CLIP ViT, frozen as the pretrained one would
  be. Random frozen features are a fixed function of the photo; the product encoder learns to
  read them. (What a pretrained encoder adds is invariance, not information.)
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from models.metrics import psnr
from models.pipeline import make_scheduler, photo_canvas
from models.tiny import TINY_TEXT_DIM, tiny_text_encoder, tiny_tokenizer
from storage.layout import DatasetRoot
from tasks.training.precompute import load_clip_window, load_product_photos

PHOTO_EVERY = 4  # every 4th VAE step trains on photo canvases (single frames) instead of video windows
CROP = (64, 96)  # spatial crop of the video windows while training the VAE
STATS_WINDOWS = 64  # train windows the latent statistics and the train PSNR are measured on
PRODUCT_WEIGHT = 8.0  # reconstruction weight of product pixels (about 4% of a frame) over backdrop ones
LOADERS = 16  # threads decoding clips and mask PNGs (PyAV and PNG decoding release the GIL)
CLIP_IMAGE_SIZE = 64
DIT = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=6,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=TINY_TEXT_DIM,
    freq_dim=256,
    ffn_dim=1536,
    num_layers=8,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
VAE = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])


def split_windows(
    dataset: Path, split: str, frames: int, stride: int, height: int, width: int, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(videos (N, 3, frames, H, W) in [0, 1], masks (N, 1, frames, H, W)): the first window of
    each clip of `split` (at most `limit`)."""
    root = DatasetRoot(dataset.resolve())
    rows = [r for r in root.read_manifest("dataset").to_pylist() if r["split"] == split][:limit]
    with ThreadPoolExecutor(LOADERS) as pool:
        windows = list(
            pool.map(
                lambda r: load_clip_window(root, r["video_path"], r["mask_dir"], frames, stride, height, width), rows
            )
        )
    return torch.stack([w[0] for w in windows]), torch.stack([w[1] for w in windows])


def photo_canvases(dataset: Path, height: int, width: int, limit: int = 2000) -> torch.Tensor:
    """(N, 3, 1, H, W): train products' photos on the grey canvas reference latents are encoded on."""
    root = DatasetRoot(dataset.resolve())
    rows = [r for r in root.read_manifest("dataset").to_pylist() if r["split"] == "train"]
    photos = [p for r in rows for p in load_product_photos(root, r["product_images"], 4)][:limit]
    return torch.stack([photo_canvas(p, height, width) for p in photos]).unsqueeze(2)


def product_crop(mask: torch.Tensor, generator: torch.Generator) -> tuple[int, int]:
    """Top-left corner (multiples of 8) of a CROP-sized crop around a window's product (mask
    (1, T, H, W)), jittered by up to a quarter crop; anywhere when the window has no product."""
    height, width = mask.shape[-2:]
    rows, cols = mask.amax(dim=(0, 1, 3)).nonzero(), mask.amax(dim=(0, 1, 2)).nonzero()
    jitter = torch.randint(-CROP[0] // 4, CROP[0] // 4 + 1, (2,), generator=generator).tolist()
    if len(rows) == 0:
        centre = (height // 2 + jitter[0] * 2, width // 2 + jitter[1] * 2)
    else:
        centre = (int(rows[0] + rows[-1]) // 2 + jitter[0], int(cols[0] + cols[-1]) // 2 + jitter[1])
    top = min(max(centre[0] - CROP[0] // 2, 0), height - CROP[0]) // 8 * 8
    left = min(max(centre[1] - CROP[1] // 2, 0), width - CROP[1]) // 8 * 8
    return top, left


def train_vae(
    clips: torch.Tensor,
    masks: torch.Tensor,
    photos: torch.Tensor,
    steps: int,
    seconds: float,
    batch_size: int,
    lr: float,
    kl_weight: float,
    device: str,
    seed: int = 0,
    log=print,
) -> tuple[AutoencoderKLWan, int]:
    """(the VAE, steps taken): a small AutoencoderKLWan trained on CROP crops around the product
    of whole windows (N, 3, T, H, W) in [0, 1] with their masks (N, 1, T, H, W), every
    PHOTO_EVERY-th step on photo canvases (N, 3, 1, H, W): L1 + MSE reconstruction, product pixels
    weighted PRODUCT_WEIGHT more, + a small KL (the VAE must stay a VAE: diffusion reads
    latent_dist.mode()), AdamW, warm-up then cosine. It stops after `steps` steps or `seconds`,
    whichever comes first, and the cosine follows that progress, so a run cut by time still ends
    annealed (a GPU call allows 10 minutes and this step cannot resume)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    step = 0
    while (progress := max(step / steps, (time.perf_counter() - started) / seconds)) < 1.0:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress))
        if step % PHOTO_EVERY == PHOTO_EVERY - 1:
            picked = photos[torch.randint(len(photos), (2 * batch_size,), generator=generator)]
            weight = torch.ones_like(picked[:, :1])
        else:
            crops = []
            for index in torch.randint(len(clips), (batch_size,), generator=generator).tolist():
                top, left = product_crop(masks[index], generator)
                window = (slice(None), slice(None), slice(top, top + CROP[0]), slice(left, left + CROP[1]))
                crops.append((clips[index][window], masks[index][window]))
            picked = torch.stack([video for video, _ in crops])
            weight = 1 + PRODUCT_WEIGHT * torch.stack([mask for _, mask in crops])
        x = picked.to(device) * 2 - 1
        weight = (weight / weight.mean()).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        recon = recon.float()
        error = recon - x
        loss = (weight * error.abs()).mean() + (weight * error**2).mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0:
            log(
                f"vae step {step:5d}  loss {loss.item():.4f}  psnr {psnr(_unit(recon), _unit(x)):.2f} dB  "
                f"{time.perf_counter() - started:.0f} s"
            )
        step += 1
    log(f"vae: {step} steps in {time.perf_counter() - started:.0f} s")
    return vae.eval(), step


def _unit(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B*T, H, W, 3) in [0, 1], the layout models.metrics measures."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
    return frames.reshape(-1, *frames.shape[2:]).cpu().numpy()


@torch.no_grad()
def round_trip(vae: AutoencoderKLWan, clips: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent_dist.mode() per clip, reconstructions in [0, 1]) of clips (N, 3, T, H, W) in [0, 1]."""
    latents, recons = [], []
    for chunk in clips.split(8):
        z = vae.encode(chunk.to(device) * 2 - 1).latent_dist.mode()
        recons.append(((vae.decode(z).sample.float().clamp(-1, 1) + 1) / 2).cpu())
        latents.append(z.float().cpu())
    return torch.cat(latents), torch.cat(recons)


def _frames(video: torch.Tensor) -> np.ndarray:
    """(N, C, T, H, W) -> (N*T, H, W, C), the layout models.metrics measures."""
    return video.permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[3:], video.shape[1]).numpy()


def measure_vae(
    vae: AutoencoderKLWan, train: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], device: str
) -> dict:
    """Per-channel latent statistics on the train windows; round-trip PSNR on the train windows,
    and on the test windows both whole and inside the mask (per clip, then the mean)."""
    train = train[:STATS_WINDOWS]
    z, train_recon = round_trip(vae, train, device)
    channels = z.transpose(0, 1).reshape(z.shape[1], -1)
    videos, masks = test
    _, test_recon = round_trip(vae, videos, device)
    mask_psnr = [
        psnr(_frames(test_recon[i : i + 1]), _frames(videos[i : i + 1]), _frames(masks[i : i + 1])[..., 0] > 0.5)
        for i in range(len(videos))
    ]
    return {
        "latents_mean": channels.mean(dim=1).tolist(),
        "latents_std": channels.std(dim=1).tolist(),
        "vae_psnr_db": psnr(_frames(train_recon), _frames(train)),
        "vae_test_psnr_db": psnr(_frames(test_recon), _frames(videos)),
        "vae_test_mask_psnr_db": float(np.mean(mask_psnr)),
        "vae_test_mask_psnr_min_db": float(np.min(mask_psnr)),
    }


def build_base(
    folder: Path,
    dataset: Path,
    frames: int,
    stride: int,
    height: int,
    width: int,
    vae_steps: int,
    vae_seconds: float,
    vae_batch: int,
    vae_lr: float,
    seed: int = 0,
    device: str = "cuda",
    log=print,
) -> dict:
    """Write the base model folder; returns measure_vae's figures + {vae_seconds, vae_steps,
    vae_batch, train_clips}."""
    clips, masks = split_windows(dataset, "train", frames, stride, height, width, limit=400)
    test = split_windows(dataset, "test", frames, stride, height, width)
    photos = photo_canvases(dataset, height, width)
    log(f"vae: {len(clips)} train windows of {tuple(clips.shape[1:])}, {len(photos)} photo canvases")
    started = time.perf_counter()
    vae, steps = train_vae(
        clips,
        masks,
        photos,
        vae_steps,
        vae_seconds,
        vae_batch,
        vae_lr,
        kl_weight=1e-6,
        device=device,
        seed=seed,
        log=log,
    )
    seconds = time.perf_counter() - started
    figures = measure_vae(vae, clips, test, device)
    vae.register_to_config(latents_mean=figures.pop("latents_mean"), latents_std=figures.pop("latents_std"))
    log(
        f"vae: {figures['vae_psnr_db']:.2f} dB on the train windows, {figures['vae_test_mask_psnr_db']:.2f} dB "
        f"inside the mask of the test windows (gate 2: >= 22), after {seconds:.0f} s"
    )

    root = DatasetRoot.create(folder)
    with root.atomic_dir("vae") as tmp:
        vae.to("cpu").save_pretrained(tmp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = {
            "transformer": WanTransformer3DModel(**DIT),
            "text_encoder": tiny_text_encoder(),
            "image_encoder": CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=128,
                    intermediate_size=512,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    image_size=CLIP_IMAGE_SIZE,
                    patch_size=8,
                )
            ),
        }
    for name, module in components.items():
        with root.atomic_dir(name) as tmp:
            module.save_pretrained(tmp)
    with root.atomic_dir("tokenizer") as tmp:
        tiny_tokenizer().save_pretrained(tmp)
    with root.atomic_dir("image_processor") as tmp:
        CLIPImageProcessor(
            size={"shortest_edge": CLIP_IMAGE_SIZE}, crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}
        ).save_pretrained(tmp)
    with root.atomic_dir("scheduler") as tmp:
        make_scheduler("unipc", 3.0).save_pretrained(tmp)
    return figures | {"vae_seconds": seconds, "vae_steps": steps, "vae_batch": vae_batch, "train_clips": len(clips)}
