"""Generation: masked video + mask + 1-5 product photos + prompt -> product video.

The photos reach the DiT as reference latents (each one VAE-encoded on a grey canvas of the
clip's size), as CLIP tokens through the product encoder, or both (model.reference). The masked
region of the video the model sees is filled with grey (0 in [-1, 1], as Wan I2V and VACE) or
black (model.masked_fill). Flow-matching sampler (UniPC or Euler with flow_shift, as Wan2.1
ships) with guidance over two conditions, VAE decode, then compositing in pixel space so pixels
outside the mask are exactly the input's.

Guidance (three branches, batched in one forward):
    v = v(null text, no product)
        + g_text    * (v(text, no product) - v(null text, no product))
        + g_product * (v(text, product)    - v(text, no product))
g_text = g_product = 1 gives the fully conditioned prediction. "No product" is K zero product
tokens and no reference tokens (exactly the base model plus masked-video channels); the null text
is the negative prompt's embeddings, or zero embeddings (the training dropout's null) when no
negative prompt is given.

Guidance at less cost, both off by default (SamplerConfig):
- joint_guidance_scale g: one branch drops both conditions, v = v(null) + g (v(full) - v(null)):
  two branches instead of three. With g_text = g_product = g the formula above reduces to this
  (the no-product branch cancels), so it is the same guidance whenever the scales are equal.
- guidance_interval [low, high]: guidance only at the steps whose noise level sigma (the
  scheduler's, 1 = pure noise) lies in the interval; the other steps run the fully
  conditioned branch alone (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval
  improves sample and distribution quality in diffusion models"). [0, 1] guides every step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from models import speed
from models.product_encoder import ProductEncoder, encode_product_images
from models.transformer import (
    LATENT_CHANNELS,
    SPATIAL_FACTOR,
    TEMPORAL_FACTOR,
    ProductWanTransformer,
    build_dit_input,
    pack_mask,
)


def make_scheduler(kind: str, flow_shift: float):
    """'unipc' (what Wan2.1's diffusers repos ship) or 'euler' (FlowMatchEulerDiscrete), both on
    the shifted flow sigma grid."""
    if kind == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000
        )
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


FILL_VALUES = {"grey": 0.5, "black": 0.0}  # in [0, 1]; grey is 0 in the VAE's [-1, 1]


def fill_masked(video: torch.Tensor, mask: torch.Tensor, fill: str) -> torch.Tensor:
    """video * (1 - mask) + FILL_VALUES[fill] * mask: the masked video the model sees. (Computed
    from clip + mask wherever the model reads it: an H.264 masked video can leak product colour.)"""
    return video * (1 - mask) + FILL_VALUES[fill] * mask


def photo_array(photo) -> np.ndarray:
    """A PIL image or uint8 array (H, W, 3|4) -> uint8 array (H, W, 4): no alpha means opaque."""
    array = np.asarray(photo.convert("RGBA") if hasattr(photo, "convert") else photo)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"a product photo must be H x W x 3 or 4 uint8, got {array.shape} {array.dtype}")
    if array.shape[2] == 3:
        array = np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return array


def flatten_alpha(photo, background: float) -> np.ndarray:
    """The photo's RGB over a flat background (in [0, 1]) where it is transparent, uint8."""
    rgba = photo_array(photo).astype(np.float32) / 255
    rgb = rgba[..., :3] * rgba[..., 3:] + background * (1 - rgba[..., 3:])
    return np.round(rgb * 255).astype(np.uint8)


def photo_canvas(photo, height: int, width: int) -> torch.Tensor:
    """(3, height, width) in [0, 1]: the photo scaled to fit (aspect kept), centred on grey, its
    transparent parts grey: the neutral canvas a reference photo is VAE-encoded on."""
    rgba = torch.from_numpy(photo_array(photo)).permute(2, 0, 1).float() / 255
    scale = min(height / rgba.shape[1], width / rgba.shape[2])
    size = (max(1, round(rgba.shape[1] * scale)), max(1, round(rgba.shape[2] * scale)))
    rgba = F.interpolate(rgba[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    canvas = torch.full((4, height, width), 0.0)
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    canvas[:, top : top + size[0], left : left + size[1]] = rgba
    grey = FILL_VALUES["grey"]
    return canvas[:3] * canvas[3:] + grey * (1 - canvas[3:])


@torch.no_grad()
def encode_reference_photos(vae: AutoencoderKLWan, photos: list, height: int, width: int) -> torch.Tensor:
    """Photos -> (N, 16, h, w) Wan-normalised latents, each photo one frame on its neutral canvas."""
    device = next(vae.parameters()).device
    canvases = torch.stack([photo_canvas(photo, height, width) for photo in photos]).unsqueeze(2).to(device)
    return encode_video(vae, canvases)[:, :, 0]


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str], max_length: int) -> torch.Tensor:
    """UMT5 embeddings (B, max_length, dim), zero after each prompt's last token, as Wan pads."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    ids, attention = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = text_encoder(ids, attention).last_hidden_state
    return hidden * attention.unsqueeze(-1).to(hidden.dtype)


def encode_prompts(
    tokenizer,
    text_encoder,
    prompts: list[str],
    negative_prompt: str | list[str] | None,
    max_length: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, null embeddings) for guidance: the null is the negative prompt's
    embeddings, or zeros (the training dropout's null) without one."""
    text = encode_text(tokenizer, text_encoder, prompts, max_length).to(dtype)
    if negative_prompt is None:
        return text, torch.zeros_like(text)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    return text, encode_text(tokenizer, text_encoder, negatives, max_length).to(dtype)


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


def composite(
    generated: torch.Tensor, masked_video: torch.Tensor, mask: torch.Tensor, feather_px: int = 0
) -> torch.Tensor:
    """generated * alpha + masked_video * (1 - alpha), alpha = feather(mask). Where alpha is 0
    the output is masked_video bit for bit (never a recomputed blend)."""
    alpha = feather(mask.to(generated.dtype), feather_px)
    blended = generated * alpha + masked_video.to(generated.dtype) * (1 - alpha)
    return torch.where(alpha > 0, blended, masked_video.to(generated.dtype))


def pad_photos(per_sample: list[torch.Tensor], count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (N_i, ...) photo tensors -> (B, N, ...) zero-padded + (B, N) bool mask, with N =
    `count` (a data-parallel rank pads to the whole micro-batch's) or the largest N_i."""
    most = count or max(len(x) for x in per_sample)
    padded = per_sample[0].new_zeros(len(per_sample), most, *per_sample[0].shape[1:])
    mask = torch.zeros(len(per_sample), most, dtype=torch.bool, device=padded.device)
    for i, photos in enumerate(per_sample):
        padded[i, : len(photos)], mask[i, : len(photos)] = photos, True
    return padded, mask


def finish(
    vae: AutoencoderKLWan,
    latents: torch.Tensor,
    masked_video: torch.Tensor,
    mask: torch.Tensor,
    feather_px: int,
    output_type: str,
):
    """The end of a generation call: the latents themselves ("latent"), or decoded and composited
    over the masked video as (B, 3, T, H, W) float in [0, 1] ("pt") or (B, T, H, W, 3) uint8 ("np")."""
    if output_type == "latent":
        return latents
    video = composite(decode_latents(vae, latents), masked_video, mask, feather_px)
    if output_type == "pt":
        return video
    if output_type == "np":
        return (video.permute(0, 2, 3, 4, 1).cpu().numpy() * 255).round().astype(np.uint8)
    raise ValueError(f"output_type must be 'pt', 'np' or 'latent', got {output_type!r}")


def combine_guidance(v_full, v_no_product, v_uncond, text_scale: float, product_scale: float):
    """The guidance formula of this module's docstring; absent branches are None (unused)."""
    guided = v_full if v_no_product is None else v_no_product + product_scale * (v_full - v_no_product)
    if v_uncond is not None:
        guided = guided + (text_scale - 1) * (v_no_product - v_uncond)
    return guided


def combine_joint_guidance(v_full, v_null, scale: float):
    """Joint guidance: v(null) + scale (v(full) - v(null)); v_null None (scale 1) is v_full."""
    return v_full if v_null is None else v_null + scale * (v_full - v_null)


def guidance_branches(text_scale: float, product_scale: float, joint_scale: float | None) -> list[tuple[str, bool]]:
    """The guidance branches a call runs, in order, as (text: "prompt" | "null", with product):
    the full condition first, then only those the scales need."""
    if joint_scale is not None:
        return [("prompt", True)] + ([("null", False)] if joint_scale != 1 else [])
    branches = [("prompt", True)]
    if product_scale != 1 or text_scale != 1:
        branches.append(("prompt", False))
    if text_scale != 1:
        branches.append(("null", False))
    return branches


def in_guidance_interval(sigma: float, interval: tuple[float, float] | None) -> bool:
    """Whether a step at noise level `sigma` is guided: always without an interval, else when
    sigma lies in [low, high]."""
    return interval is None or interval[0] <= sigma <= interval[1]


class ProductVideoPipeline(DiffusionPipeline):
    """diffusers pipeline over the Wan VAE, UMT5, the product DiT and, for CLIP product tokens,
    the CLIP vision tower and the product encoder (None otherwise). Built by the model
    specification (models/product_spec.py), which loads the components."""

    model_cpu_offload_seq = "text_encoder->image_encoder->product_encoder->transformer->vae"
    _optional_components = ["image_encoder", "image_processor", "product_encoder"]  # CLIP path only

    def __init__(
        self,
        vae: AutoencoderKLWan,
        text_encoder: UMT5EncoderModel,
        tokenizer,
        transformer: ProductWanTransformer,
        scheduler,
        image_encoder: CLIPVisionModel | None = None,
        image_processor: CLIPImageProcessor | None = None,
        product_encoder: ProductEncoder | None = None,
        text_max_length: int = 512,
        max_product_images: int = 5,
        masked_fill: str = "grey",
    ):
        super().__init__()
        if transformer.uses_product_tokens and (image_encoder is None or product_encoder is None):
            raise ValueError(f"reference {transformer.config.reference!r} needs the image encoder and product encoder")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            image_encoder=image_encoder,
            image_processor=image_processor,
            product_encoder=product_encoder,
            transformer=transformer,
            scheduler=scheduler,
        )
        self.register_to_config(
            text_max_length=text_max_length, max_product_images=max_product_images, masked_fill=masked_fill
        )

    def _check_inputs(self, masked_video, mask, product_images, prompts):
        batch, channels, frames, height, width = masked_video.shape
        if channels != 3 or mask.shape != (batch, 1, frames, height, width):
            raise ValueError(
                f"masked_video must be (B, 3, T, H, W) and mask (B, 1, T, H, W); got "
                f"{tuple(masked_video.shape)} and {tuple(mask.shape)}"
            )
        multiple = SPATIAL_FACTOR * self.transformer.wan.config.patch_size[1]
        if (frames - 1) % TEMPORAL_FACTOR or height % multiple or width % multiple:
            raise ValueError(f"need 4k+1 frames and H, W divisible by {multiple}; got {frames}x{height}x{width}")
        if len(product_images) != batch or len(prompts) != batch:
            raise ValueError(f"batch {batch}: got {len(product_images)} image lists and {len(prompts)} prompts")
        counts = [len(photos) for photos in product_images]
        if min(counts) < 1 or max(counts) > self.config.max_product_images:
            raise ValueError(f"each sample needs 1..{self.config.max_product_images} product photos, got {counts}")

    def _encode_photos(self, product_images: list, size: tuple[int, int], dtype: torch.dtype):
        """(product tokens (B, K, D) or None, reference latents (B, N, 16, h, w) or None, photo
        mask (B, N) bool or None) for each sample's photos, as model.reference asks."""
        product = references = photo_mask = None
        if self.transformer.uses_product_tokens:  # CLIP sees a product page's white behind a cut-out
            on_white = [[flatten_alpha(photo, 1.0) for photo in photos] for photos in product_images]
            image_tokens, image_mask = encode_product_images(
                self.image_encoder, self.image_processor, on_white, self.config.max_product_images
            )
            product = self.product_encoder(image_tokens.to(self.product_encoder.dtype), image_mask).to(dtype)
        if self.transformer.uses_reference_latents:
            encoded = [encode_reference_photos(self.vae, photos, *size) for photos in product_images]
            references, photo_mask = pad_photos(encoded)
            references = references.to(dtype)
        return product, references, photo_mask

    @torch.no_grad()
    def __call__(
        self,
        masked_video: torch.Tensor,
        mask: torch.Tensor,
        product_images: list,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        text_guidance_scale: float = 5.0,
        product_guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        feather_px: int = 0,
        output_type: str = "pt",
        callback: Callable[[int, int], None] | None = None,
        attention_backend: str = "cudnn",
        guidance_interval: tuple[float, float] | None = None,
        joint_guidance_scale: float | None = None,
    ):
        """masked_video (B, 3, T, H, W) in [0, 1], T = 4k+1; mask (B, 1, T, H, W), 1 = put the
        product here; product_images: per sample a list of 1-5 PIL images / uint8 arrays.
        Returns (B, 3, T, H, W) float in [0, 1] ("pt"), (B, T, H, W, 3) uint8 ("np"), or the
        normalised latents ("latent"). callback(step, total) is called after each step.
        attention_backend: "cudnn" (cuDNN's fused attention first on CUDA) or "default"
        (PyTorch's order), see models/speed.py; compilation and a step cache are set on the
        transformer (models.speed). guidance_interval, joint_guidance_scale: guidance at less
        cost (the module doc), None = off."""
        if guidance_interval is not None and not 0 <= guidance_interval[0] <= guidance_interval[1] <= 1:
            raise ValueError(f"guidance_interval must be (low, high) within [0, 1], got {guidance_interval}")
        if guidance_interval is not None and self.transformer.wan.is_cache_enabled:
            raise ValueError(
                "a step cache compares each step with the previous one of the same batch, and the "
                "guidance interval changes the batch between steps: use one or the other"
            )
        with speed.attention(attention_backend, self._execution_device):
            return self._generate(
                masked_video,
                mask,
                product_images,
                prompt,
                negative_prompt,
                num_inference_steps,
                text_guidance_scale,
                product_guidance_scale,
                generator,
                feather_px,
                output_type,
                callback,
                guidance_interval,
                joint_guidance_scale,
            )

    def _generate(
        self,
        masked_video,
        mask,
        product_images,
        prompt,
        negative_prompt,
        num_inference_steps,
        text_guidance_scale,
        product_guidance_scale,
        generator,
        feather_px,
        output_type,
        callback,
        guidance_interval=None,
        joint_guidance_scale=None,
    ):
        prompts = [prompt] * masked_video.shape[0] if isinstance(prompt, str) else list(prompt)
        self._check_inputs(masked_video, mask, product_images, prompts)
        device, dtype = self._execution_device, self.transformer.dtype
        batch = masked_video.shape[0]
        mask = mask.to(device, torch.float32)
        # Fill the region again here: a lossy re-encoded masked video can leak product colour.
        known = fill_masked(masked_video.to(device, torch.float32), mask, self.config.masked_fill)

        masked_latents = encode_video(self.vae, known)
        packed_mask = pack_mask(mask, masked_latents.shape[-2:])
        text, null_text = encode_prompts(
            self.tokenizer, self.text_encoder, prompts, negative_prompt, self.config.text_max_length, dtype
        )
        product, references, photo_mask = self._encode_photos(product_images, masked_video.shape[-2:], dtype)

        # Branch order: full, no product, neither (or full, neither: joint); only those the scales need.
        texts = {"prompt": text, "null": null_text}
        branches = [
            (texts[which], with_product)
            for which, with_product in guidance_branches(
                text_guidance_scale, product_guidance_scale, joint_guidance_scale
            )
        ]
        branch_text = torch.cat([t for t, _ in branches])
        keep = torch.tensor([float(with_product) for _, with_product in branches], device=device)
        keep = keep.repeat_interleave(batch)
        branch_product = (
            None if product is None else product.repeat(len(branches), 1, 1) * keep.view(-1, 1, 1).to(dtype)
        )
        branch_references = branch_keys = None
        if references is not None:
            branch_references = references.repeat(len(branches), 1, 1, 1, 1)
            branch_keys = photo_mask.repeat(len(branches), 1) & keep.view(-1, 1).bool()

        latents = randn_tensor(
            (batch, LATENT_CHANNELS, *masked_latents.shape[2:]), generator=generator, device=device, dtype=torch.float32
        )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.transformer.reset_step_cache()  # a step cache compares with the previous step of this call only
        sigmas = self.scheduler.sigmas.tolist()  # the noise level of each step (timesteps are sigma x 1000)
        for step, t in enumerate(timesteps):
            # Outside the guidance interval only the first branch (the full condition) runs.
            count = len(branches) if in_guidance_interval(sigmas[step], guidance_interval) else 1
            rows = count * batch
            dit_input = build_dit_input(latents, masked_latents, packed_mask).to(dtype)
            dit_input = dit_input.repeat(count, 1, 1, 1, 1)
            with self.transformer.wan.cache_context(speed.CACHE_CONTEXT):  # all branches are one batch, one cache
                velocity = self.transformer(
                    dit_input,
                    t.expand(dit_input.shape[0]),
                    branch_text[:rows],
                    None if branch_product is None else branch_product[:rows],
                    None if branch_references is None else branch_references[:rows],
                    None if branch_keys is None else branch_keys[:rows],
                    return_dict=False,
                )[0].float()
            parts = list(velocity.chunk(count))
            if count == 1:
                guided = parts[0]
            elif joint_guidance_scale is not None:
                guided = combine_joint_guidance(*parts, scale=joint_guidance_scale)
            else:
                parts += [None] * (3 - count)
                guided = combine_guidance(*parts, text_scale=text_guidance_scale, product_scale=product_guidance_scale)
            latents = self.scheduler.step(guided, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(step + 1, len(timesteps))

        self.transformer.reset_step_cache()  # and let go of the residuals it holds
        return finish(self.vae, latents, masked_video.to(device, torch.float32), mask, feather_px, output_type)
