"""The PoC's base model folder, laid out like Wan-AI/Wan2.1-T2V-1.3B-Diffusers, so the project's
config, train and evaluate flows load it exactly as they load the real one.

- vae/: an AutoencoderKLWan trained here on the train split's clips. The pretrained Wan VAE
  cannot be downloaded, and no fixed map is invertible in Wan's latent layout (16 channels for
  4 x 8 x 8 x 3 = 768 pixel values per latent cell), which the model code relies on. So a small
  Wan VAE (same class, narrower) learns this data; its latents_mean/std are measured on the train
  clips, as Wan's per-channel statistics are, so normalised latents are about N(0, 1).
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
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from models.metrics import psnr
from models.pipeline import make_scheduler
from models.tiny import TINY_TEXT_DIM, tiny_text_encoder, tiny_tokenizer
from storage.layout import DatasetRoot
from tasks.precompute import load_clip_window

CLIP_IMAGE_SIZE = 64
DIT = dict(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=64, in_channels=16, out_channels=16,
           text_dim=TINY_TEXT_DIM, freq_dim=256, ffn_dim=1536, num_layers=8, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
VAE = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])


def train_clips(dataset: Path, frames: int, stride: int, height: int, width: int) -> torch.Tensor:
    """(N, 3, frames, H, W) in [0, 1]: a window of every train-split clip of the dataset."""
    root = DatasetRoot(dataset.resolve())
    rows = [r for r in root.read_manifest("dataset").to_pylist() if r["split"] == "train"]
    windows = [load_clip_window(root, r["video_path"], r["mask_dir"], frames, stride, height, width)[0] for r in rows]
    return torch.stack(windows)


def train_vae(clips: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float, device: str,
              seed: int = 0, window: int = 9, log=print) -> AutoencoderKLWan:
    """Train a small AutoencoderKLWan on random `window`-frame crops of clips (N, 3, T, H, W) in
    [0, 1]: L1 + MSE reconstruction + a small KL (the VAE must stay a VAE: diffusion reads
    latent_dist.mode()), AdamW, warm-up then cosine. The VAE is causal, so a window may start anywhere."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(steps):
        start = int(torch.randint(clips.shape[2] - window + 1, (1,), generator=generator))
        picked = clips[torch.randint(len(clips), (batch_size,), generator=generator), :, start:start + window]
        x = picked.to(device) * 2 - 1
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        recon = recon.float()
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step:5d}  loss {loss.item():.4f}  psnr {psnr(_unit(recon), _unit(x)):.2f} dB  "
                f"{time.perf_counter() - started:.0f} s")
    return vae.eval()


def _unit(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B*T, H, W, 3) in [0, 1], the layout models.metrics measures."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
    return frames.reshape(-1, *frames.shape[2:]).cpu().numpy()


@torch.no_grad()
def measure_latent_stats(vae: AutoencoderKLWan, clips: torch.Tensor, device: str) -> tuple[list, list, float]:
    """(per-channel mean, per-channel std of latent_dist.mode(), reconstruction PSNR) over clips."""
    latents, errors = [], []
    for chunk in clips.split(2):
        x = chunk.to(device) * 2 - 1
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample.clamp(-1, 1)
        latents.append(z.float().transpose(0, 1).reshape(z.shape[1], -1).cpu())
        errors.append(((recon.float() - x) / 2).pow(2).mean().item())
    z = torch.cat(latents, dim=1)
    return z.mean(dim=1).tolist(), z.std(dim=1).tolist(), float(10 * np.log10(1 / np.mean(errors)))


def build_base(folder: Path, dataset: Path, frames: int, stride: int, height: int, width: int, vae_steps: int,
               vae_batch: int, vae_lr: float, seed: int = 0, device: str = "cuda", log=print) -> dict:
    """Write the base model folder; returns {vae_psnr_db, vae_seconds, train_clips}."""
    clips = train_clips(dataset, frames, stride, height, width)
    log(f"vae: {len(clips)} train clips of {tuple(clips.shape[1:])}")
    started = time.perf_counter()
    vae = train_vae(clips, vae_steps, vae_batch, vae_lr, kl_weight=1e-6, device=device, seed=seed, log=log)
    seconds = time.perf_counter() - started
    mean, std, vae_psnr = measure_latent_stats(vae, clips, device)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    log(f"vae: reconstruction {vae_psnr:.2f} dB on the train clips after {seconds:.0f} s")

    root = DatasetRoot.create(folder)
    with root.atomic_dir("vae") as tmp:
        vae.to("cpu").save_pretrained(tmp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = {"transformer": WanTransformer3DModel(**DIT), "text_encoder": tiny_text_encoder(),
                      "image_encoder": CLIPVisionModel(CLIPVisionConfig(
                          hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          image_size=CLIP_IMAGE_SIZE, patch_size=8))}
    for name, module in components.items():
        with root.atomic_dir(name) as tmp:
            module.save_pretrained(tmp)
    with root.atomic_dir("tokenizer") as tmp:
        tiny_tokenizer().save_pretrained(tmp)
    with root.atomic_dir("image_processor") as tmp:
        CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                           crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}).save_pretrained(tmp)
    with root.atomic_dir("scheduler") as tmp:
        make_scheduler("unipc", 3.0).save_pretrained(tmp)
    return {"vae_psnr_db": vae_psnr, "vae_seconds": seconds, "train_clips": len(clips)}
