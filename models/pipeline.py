"""Generation: masked video + mask + 1-5 product photos + prompt -> product video.

Flow-matching sampler (UniPC or Euler with flow_shift, as Wan2.1 ships) with guidance over two
conditions, VAE decode, then compositing in pixel space so pixels outside the mask are exactly
the input's.

Guidance (three branches, batched in one forward):
    v = v(null text, no product)
        + g_text    * (v(text, no product) - v(null text, no product))
        + g_product * (v(text, product)    - v(text, no product))
g_text = g_product = 1 gives the fully conditioned prediction. "No product" is K zero product
tokens (exactly the base model plus masked-video channels); the null text is the negative prompt's
embeddings, or zero embeddings (the training dropout's null) when no negative prompt is given.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,
                       UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from models import speed
from models.product_encoder import ProductEncoder, encode_product_images
from models.transformer import (LATENT_CHANNELS, SPATIAL_FACTOR, TEMPORAL_FACTOR, ProductVideoGenerator,
                                ProductWanTransformer, build_dit_input, pack_mask)

if TYPE_CHECKING:  # annotations only: generation itself needs no pydantic
    from models.config import ModelConfig


def make_scheduler(kind: str, flow_shift: float):
    """'unipc' (what Wan2.1's diffusers repos ship) or 'euler' (FlowMatchEulerDiscrete), both on
    the shifted flow sigma grid."""
    if kind == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=flow_shift, num_train_timesteps=1000)
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=flow_shift, num_train_timesteps=1000)
    raise ValueError(f"unknown scheduler {kind!r} (unipc or euler)")


def _latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """Video (B, 3, T, H, W) in [0, 1] -> Wan-normalised latents (z - mean) / std, as diffusers'
    Wan pipelines normalise them (the distribution mode, like its I2V condition)."""
    latents = vae.encode((video * 2 - 1).to(vae.dtype)).latent_dist.mode().float()
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of encode_video: normalised latents -> video (B, 3, T, H, W) in [0, 1]."""
    mean, std = _latent_stats(vae, latents.float())
    video = vae.decode((latents.float() * std + mean).to(vae.dtype)).sample
    return ((video.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str], max_length: int) -> torch.Tensor:
    """UMT5 embeddings (B, max_length, dim), zero after each prompt's last token, as Wan pads."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids, attention = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = text_encoder(ids, attention).last_hidden_state
    return hidden * attention.unsqueeze(-1).to(hidden.dtype)


def feather(mask: torch.Tensor, feather_px: int) -> torch.Tensor:
    """Blend weight: 1 inside the mask, ramping to 0 within feather_px pixels outside it (a box
    blur of the mask, so pixels farther than feather_px from the mask get exactly 0)."""
    if feather_px == 0:
        return mask
    batch, channels, frames, height, width = mask.shape
    per_frame = mask.transpose(1, 2).reshape(batch * frames, channels, height, width)
    size = 2 * feather_px + 1
    blurred = F.avg_pool2d(per_frame, size, stride=1, padding=feather_px, count_include_pad=True)
    blurred = blurred.reshape(batch, frames, channels, height, width).transpose(1, 2)
    return torch.maximum(mask, blurred)


def composite(generated: torch.Tensor, masked_video: torch.Tensor, mask: torch.Tensor,
              feather_px: int = 0) -> torch.Tensor:
    """generated * alpha + masked_video * (1 - alpha), alpha = feather(mask). Where alpha is 0
    the output is masked_video bit for bit (never a recomputed blend)."""
    alpha = feather(mask.to(generated.dtype), feather_px)
    blended = generated * alpha + masked_video.to(generated.dtype) * (1 - alpha)
    return torch.where(alpha > 0, blended, masked_video.to(generated.dtype))


def combine_guidance(v_full, v_no_product, v_uncond, text_scale: float, product_scale: float):
    """The guidance formula of this module's docstring; absent branches are None (unused)."""
    guided = v_full if v_no_product is None else v_no_product + product_scale * (v_full - v_no_product)
    if v_uncond is not None:
        guided = guided + (text_scale - 1) * (v_no_product - v_uncond)
    return guided


class ProductVideoPipeline(DiffusionPipeline):
    """diffusers pipeline over the Wan VAE, UMT5, CLIP vision tower, product encoder and DiT."""

    model_cpu_offload_seq = "text_encoder->image_encoder->product_encoder->transformer->vae"

    def __init__(self, vae: AutoencoderKLWan, text_encoder: UMT5EncoderModel, tokenizer,
                 image_encoder: CLIPVisionModel, image_processor: CLIPImageProcessor,
                 product_encoder: ProductEncoder, transformer: ProductWanTransformer, scheduler,
                 text_max_length: int = 512, max_product_images: int = 5):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              image_encoder=image_encoder, image_processor=image_processor,
                              product_encoder=product_encoder, transformer=transformer, scheduler=scheduler)
        self.register_to_config(text_max_length=text_max_length, max_product_images=max_product_images)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, checkpoint: str | None = None,
                          torch_dtype: torch.dtype | None = None) -> "ProductVideoPipeline":
        """Components from the config's base model and image encoder; the product generator from
        `checkpoint` (a ProductVideoGenerator folder, full or adapter) or fresh (gates at zero)."""
        generator = (ProductVideoGenerator.from_pretrained(checkpoint, torch_dtype=torch_dtype) if checkpoint
                     else ProductVideoGenerator.from_model_config(cfg, torch_dtype=torch_dtype))
        return cls.from_generator(generator, cfg, torch_dtype)

    @classmethod
    def from_generator(cls, generator: ProductVideoGenerator, cfg: ModelConfig,
                       torch_dtype: torch.dtype | None = None) -> "ProductVideoPipeline":
        """A pipeline around `generator` with the frozen components of `cfg`: UMT5, the CLIP
        vision tower, the scheduler and the VAE, which stays float32 as diffusers' Wan examples
        keep it."""
        return cls(
            vae=AutoencoderKLWan.from_pretrained(cfg.base_model, subfolder="vae", torch_dtype=torch.float32),
            text_encoder=UMT5EncoderModel.from_pretrained(cfg.base_model, subfolder="text_encoder",
                                                          dtype=torch_dtype),
            tokenizer=AutoTokenizer.from_pretrained(cfg.base_model, subfolder="tokenizer"),
            image_encoder=CLIPVisionModel.from_pretrained(cfg.image_encoder, subfolder=cfg.image_encoder_subfolder,
                                                          dtype=torch_dtype),
            image_processor=CLIPImageProcessor.from_pretrained(cfg.image_encoder,
                                                               subfolder=cfg.image_processor_subfolder),
            product_encoder=generator.product_encoder, transformer=generator.transformer,
            scheduler=make_scheduler(cfg.sampler.scheduler, cfg.flow_shift),
            text_max_length=cfg.text_max_length, max_product_images=cfg.max_product_images)

    def _check_inputs(self, masked_video, mask, product_images, prompts):
        batch, channels, frames, height, width = masked_video.shape
        if channels != 3 or mask.shape != (batch, 1, frames, height, width):
            raise ValueError(f"masked_video must be (B, 3, T, H, W) and mask (B, 1, T, H, W); got "
                             f"{tuple(masked_video.shape)} and {tuple(mask.shape)}")
        multiple = SPATIAL_FACTOR * self.transformer.wan.config.patch_size[1]
        if (frames - 1) % TEMPORAL_FACTOR or height % multiple or width % multiple:
            raise ValueError(f"need 4k+1 frames and H, W divisible by {multiple}; got {frames}x{height}x{width}")
        if len(product_images) != batch or len(prompts) != batch:
            raise ValueError(f"batch {batch}: got {len(product_images)} image lists and {len(prompts)} prompts")

    @torch.no_grad()
    def __call__(self, masked_video: torch.Tensor, mask: torch.Tensor, product_images: list, prompt: str | list[str],
                 negative_prompt: str | list[str] | None = None, num_inference_steps: int = 50,
                 text_guidance_scale: float = 5.0, product_guidance_scale: float = 3.0,
                 generator: torch.Generator | None = None, feather_px: int = 0, output_type: str = "pt",
                 callback: Callable[[int, int], None] | None = None, attention_backend: str = "cudnn"):
        """masked_video (B, 3, T, H, W) in [0, 1], T = 4k+1; mask (B, 1, T, H, W), 1 = put the
        product here; product_images: per sample a list of 1-5 PIL images / uint8 arrays.
        Returns (B, 3, T, H, W) float in [0, 1] ("pt"), (B, T, H, W, 3) uint8 ("np"), or the
        normalised latents ("latent"). callback(step, total) is called after each step.
        attention_backend: "cudnn" (cuDNN's fused attention first on CUDA) or "default"
        (PyTorch's order), see models/speed.py; compilation and the step cache are set on the
        transformer (models.speed.apply_generation_speed)."""
        with speed.attention(attention_backend, self._execution_device):
            return self._generate(masked_video, mask, product_images, prompt, negative_prompt, num_inference_steps,
                                  text_guidance_scale, product_guidance_scale, generator, feather_px, output_type,
                                  callback)

    def _generate(self, masked_video, mask, product_images, prompt, negative_prompt, num_inference_steps,
                  text_guidance_scale, product_guidance_scale, generator, feather_px, output_type, callback):
        prompts = [prompt] * masked_video.shape[0] if isinstance(prompt, str) else list(prompt)
        self._check_inputs(masked_video, mask, product_images, prompts)
        device, dtype = self._execution_device, self.transformer.dtype
        batch = masked_video.shape[0]
        mask = mask.to(device, torch.float32)
        # Zero the region again here: a lossy re-encoded masked video can leak product colour.
        known = masked_video.to(device, torch.float32) * (1 - mask)

        masked_latents = encode_video(self.vae, known)
        packed_mask = pack_mask(mask, masked_latents.shape[-2:])
        text = encode_text(self.tokenizer, self.text_encoder, prompts, self.config.text_max_length).to(dtype)
        if negative_prompt is None:
            null_text = torch.zeros_like(text)
        else:
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            null_text = encode_text(self.tokenizer, self.text_encoder, negatives, self.config.text_max_length).to(dtype)
        image_tokens, image_mask = encode_product_images(self.image_encoder, self.image_processor, product_images,
                                                         self.config.max_product_images)
        product = self.product_encoder(image_tokens.to(self.product_encoder.dtype), image_mask).to(dtype)
        no_product = torch.zeros_like(product)

        # Branch order: full, no product, neither; only those the scales need.
        branches = [(text, product)]
        if product_guidance_scale != 1 or text_guidance_scale != 1:
            branches.append((text, no_product))
        if text_guidance_scale != 1:
            branches.append((null_text, no_product))
        branch_text = torch.cat([t for t, _ in branches])
        branch_product = torch.cat([p for _, p in branches])

        latents = randn_tensor((batch, LATENT_CHANNELS, *masked_latents.shape[2:]), generator=generator,
                               device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.transformer.reset_step_cache()  # a step cache compares with the previous step of this call only
        for step, t in enumerate(timesteps):
            dit_input = build_dit_input(latents, masked_latents, packed_mask).to(dtype)
            dit_input = dit_input.repeat(len(branches), 1, 1, 1, 1)
            with self.transformer.wan.cache_context("guided"):  # all branches are one batch, one cache
                velocity = self.transformer(dit_input, t.expand(dit_input.shape[0]), branch_text, branch_product,
                                            return_dict=False)[0].float()
            parts = list(velocity.chunk(len(branches))) + [None] * (3 - len(branches))
            guided = combine_guidance(*parts, text_scale=text_guidance_scale, product_scale=product_guidance_scale)
            latents = self.scheduler.step(guided, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(step + 1, len(timesteps))

        self.transformer.reset_step_cache()  # and let go of the residuals it holds
        if output_type == "latent":
            return latents
        video = composite(decode_latents(self.vae, latents), masked_video.to(device, torch.float32), mask, feather_px)
        if output_type == "pt":
            return video
        if output_type == "np":
            return (video.permute(0, 2, 3, 4, 1).cpu().numpy() * 255).round().astype(np.uint8)
        raise ValueError(f"output_type must be 'pt', 'np' or 'latent', got {output_type!r}")
