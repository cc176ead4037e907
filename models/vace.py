"""The `vace` backend: diffusers' Wan2.1-VACE (`WanVACETransformer3DModel`), zero-shot or with a LoRA.

`model.base_model` is a diffusers Wan2.1-VACE folder or hub id (transformer/, vae/, text_encoder/,
tokenizer/; 1.3B or 14B). VACE conditions on a control video beside the noisy latents:
- the masked video with VACE's grey fill (0 in [-1, 1]) and the mask, which WanVACEPipeline turns
  into 32 channels of latents (inactive = video x (1 - mask), reactive = video x mask, both
  encoded) + 64 channels of 8x8-unshuffled mask (`prepare_video_latents`, `prepare_masks`);
- the product photos as reference images: each composited on a white canvas of the clip's size
  and VAE-encoded as one latent frame, prepended in time to the control latents (zero reactive
  latents and zero mask beside it) and to the noisy latents.
So the untrained generator (the LoRA's B matrices at zero) is exactly zero-shot VACE, and a user
can score it with the generate and evaluate flows before training anything.

The no-product condition of a sample (keep_product 0, or a call without photos) is VACE without
reference frames at all, as diffusers runs it when `reference_images` is None: the attention sees
no extra frames and the video keeps its rotary positions, so it is exactly the zero-shot inpainter.

The folder `save_generator` writes:
    lora/pytorch_lora_weights.safetensors  diffusers' `save_lora_adapter` (the LoraConfig in its metadata)
    transformer/                           full saves only: the transformer's own weights (LoRA unfused,
                                           so a reload computes bit for bit what was saved), loadable
                                           with WanVACETransformer3DModel.from_pretrained
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel
from huggingface_hub import save_torch_state_dict
from peft import LoraConfig
from torch import nn
from transformers import AutoTokenizer, UMT5EncoderModel

from models import speed
from models.objective import NUM_TRAIN_TIMESTEPS
from models.pipeline import encode_prompts, encode_text, encode_video, finish, make_scheduler
from models.spec import ModelSpecification, check_stage
from models.transformer import pack_mask

if TYPE_CHECKING:  # annotations only
    from models.config import ModelConfig

LORA_FOLDER = "lora"
TRANSFORMER_FOLDER = "transformer"
ADAPTER_NAME = "default"
# Attention projections of the DiT blocks and the VACE blocks (peft matches the whole module name).
LORA_TARGETS = r"(vace_)?blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
# The reference canvas: WanVACEPipeline.preprocess_conditions pads reference images with ones in
# [-1, 1] (white), as VACE was trained; cut-outs are composited on the same white.
CANVAS_COLOUR = (255, 255, 255)
GREY = 0.5  # VACE's fill of the region to generate: 0 in [-1, 1]


class VaceGenerator(nn.Module):
    """The trained part of the `vace` backend: a WanVACETransformer3DModel carrying a LoRA."""

    def __init__(self, transformer: WanVACETransformer3DModel):
        super().__init__()
        self.transformer = transformer


@dataclass
class VaceEncoders:
    """The frozen encoders precompute runs, plus what WanVACEPipeline's preprocessing methods read of
    their pipeline (the VAE, its scale factors, the transformer's patch size), so that encode_clip
    calls `prepare_video_latents` and `prepare_masks` themselves without loading the transformer."""

    vae: AutoencoderKLWan
    text_encoder: UMT5EncoderModel
    tokenizer: object
    patch_size: tuple[int, int, int]
    transformer_2 = None

    @property
    def transformer(self) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(patch_size=self.patch_size))

    @property
    def vae_scale_factor_temporal(self) -> int:
        return 2 ** sum(self.vae.temperal_downsample)

    @property
    def vae_scale_factor_spatial(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)


def reference_canvas(photo: np.ndarray | PIL.Image.Image, height: int, width: int) -> PIL.Image.Image:
    """A photo (RGBA cut-out or RGB, uint8 array or PIL) fitted into height x width, aspect kept,
    centred on white: WanVACEPipeline.preprocess_conditions' resize-and-pad, done here so that
    training encodes the very image generation passes (on which diffusers' own step is then exact)."""
    image = photo if isinstance(photo, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(photo))
    image = image.convert("RGBA")
    scale = min(height / image.height, width / image.width)
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    resized = image.resize(size, PIL.Image.BILINEAR)
    canvas = PIL.Image.new("RGB", (width, height), CANVAS_COLOUR)
    canvas.paste(resized, ((width - size[0]) // 2, (height - size[1]) // 2), mask=resized)
    return canvas


def grey_filled(video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Video in [0, 1] with the region (mask > 0.5, as prepare_video_latents binarises) grey, so
    that VACE's reactive stream (video x mask) is zero there: nothing of the old content leaks."""
    return torch.where(mask > 0.5, torch.full_like(video, GREY), video)


def _image_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


@torch.no_grad()
def control_latents(encoders: VaceEncoders, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Video (3, T, H, W) in [0, 1] and mask (1, T, H, W) -> VACE's control input without references
    (96, T', h, w): diffusers' own prepare_video_latents + prepare_masks on the grey-filled video."""
    device = next(encoders.vae.parameters()).device
    mask3 = mask.expand(3, -1, -1, -1)[None].to(device, torch.float32)  # the RGB masks diffusers reads
    signed = grey_filled(video[None].to(device, torch.float32), mask3) * 2 - 1
    latents = WanVACEPipeline.prepare_video_latents(encoders, signed, mask3, [[]], device=device)
    packed = WanVACEPipeline.prepare_masks(encoders, mask3, [[]])
    return torch.cat([latents, packed.to(latents.dtype)], dim=1)[0].float()


def vace_velocity(
    transformer: WanVACETransformer3DModel,
    noisy_latents: torch.Tensor,
    timestep: torch.Tensor,
    text_embeds: torch.Tensor,
    control: torch.Tensor,
    reference_latents: torch.Tensor,
) -> torch.Tensor:
    """The VACE forward of WanVACEPipeline's denoising step (control scale 1) with k references per
    sample (reference_latents (B, k, 16, 1, h, w)), returning the velocity of the video frames only.

    The references are prepended in time as diffusers does: prepare_video_latents prepends them one
    by one (the last ends up first), each beside zero reactive latents, and prepare_masks a zero mask
    frame per reference. Their slots in the noisy input hold them noised to the sample's level, as
    VACE fine-tuning does (DiffSynth-Studio's Wan VACE unit concatenates the reference latents to the
    input latents before noising): the sampler's slots start from noise and follow that path."""
    count = reference_latents.shape[1]
    if count:
        references = reference_latents.flip(1).squeeze(3).transpose(1, 2).float()  # (B, 16, k, h, w)
        beside = references.new_zeros(
            references.shape[0], control.shape[1] - references.shape[1], *references.shape[2:]
        )
        control = torch.cat([torch.cat([references, beside], dim=1).to(control.dtype), control], dim=2)
        sigma = (timestep.float() / NUM_TRAIN_TIMESTEPS).view(-1, 1, 1, 1, 1)
        noised = (1 - sigma) * references + sigma * torch.randn_like(references)
        noisy_latents = torch.cat([noised.to(noisy_latents.dtype), noisy_latents], dim=2)
    dtype = transformer.dtype
    velocity = transformer(
        hidden_states=noisy_latents.to(dtype),
        timestep=timestep,
        encoder_hidden_states=text_embeds.to(dtype),
        control_hidden_states=control.to(dtype),
        return_dict=False,
    )[0]
    return velocity[:, :, count:]


def step_progress(callback, done: int, total: int):
    """diffusers' callback_on_step_end reporting callback(done + step, total), or None."""
    if callback is None:
        return None

    def report(pipe, step, timestep, tensors):
        callback(done + step + 1, total)
        return {}

    return report


def _pad_photos(tensors: list[torch.Tensor], photos: int) -> tuple[torch.Tensor, torch.Tensor]:
    if any(len(t) > photos for t in tensors):
        raise ValueError(f"a sample has {max(len(t) for t in tensors)} photos, more than {photos}")
    padded = torch.stack([torch.cat([t, t.new_zeros(photos - len(t), *t.shape[1:])]) for t in tensors])
    present = torch.stack([torch.arange(photos) < len(t) for t in tensors])
    return padded, present


class VaceSpecification(ModelSpecification):
    """diffusers' Wan2.1-VACE with a LoRA on the attention projections of its blocks and VACE blocks."""

    # -- precompute ---------------------------------------------------------------------------

    def load_encoders(self, device: torch.device, dtype: torch.dtype) -> VaceEncoders:
        """VAE (float32), UMT5 and its tokenizer from base_model; no CLIP (references are VAE latents)."""
        base = self.cfg.base_model
        vae = AutoencoderKLWan.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32)
        text_encoder = UMT5EncoderModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype)
        patch_size = WanVACETransformer3DModel.load_config(base, subfolder=TRANSFORMER_FOLDER)["patch_size"]
        return VaceEncoders(
            vae.to(device).eval(),
            text_encoder.to(device).eval(),
            AutoTokenizer.from_pretrained(base, subfolder="tokenizer"),
            tuple(patch_size),
        )

    def encode_clip(
        self, encoders: VaceEncoders, video: torch.Tensor, mask: torch.Tensor, prompt: str
    ) -> dict[str, torch.Tensor]:
        """latents (16, T', h, w) the clean video, Wan-normalised; control_latents (96, T', h, w);
        text_embeds (L, dim); packed_mask (4, T', h, w), which the objective's mask weights read."""
        device = next(encoders.vae.parameters()).device
        latents = encode_video(encoders.vae, video[None].to(device, torch.float32))[0]
        text = encode_text(encoders.tokenizer, encoders.text_encoder, [prompt], self.cfg.text_max_length)[0]
        return {
            "latents": latents.cpu(),
            "control_latents": control_latents(encoders, video, mask).cpu(),
            "text_embeds": text.cpu(),
            "packed_mask": pack_mask(mask[None].float(), latents.shape[-2:])[0],
        }

    def encode_product(
        self, encoders: VaceEncoders, photos: list[np.ndarray], height: int, width: int
    ) -> dict[str, torch.Tensor]:
        """reference_latents (N, 16, 1, h, w): each photo on its white canvas, VAE-encoded as one frame."""
        device = next(encoders.vae.parameters()).device
        canvases = [_image_tensor(reference_canvas(photo, height, width)) for photo in photos]
        images = torch.stack(canvases)[:, :, None].to(device)  # (N, 3, 1, H, W)
        return {"reference_latents": encode_video(encoders.vae, images).cpu()}

    def collate(self, samples: list[dict[str, torch.Tensor]], photos: int | None = None) -> dict[str, torch.Tensor]:
        references = [sample["reference_latents"] for sample in samples]
        photos = max(len(r) for r in references) if photos is None else photos
        batch = {
            key: torch.stack([sample[key] for sample in samples]) for key in samples[0] if key != "reference_latents"
        }
        batch["reference_latents"], batch["photo_mask"] = _pad_photos(references, photos)
        return batch

    # -- training -----------------------------------------------------------------------------

    def lora_config(self) -> LoraConfig:
        """LoRA of rank reference_lora_rank (alpha = rank: scale 1); peft starts B at zero."""
        rank = self.cfg.reference_lora_rank
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True)

    def build_generator(self, torch_dtype: torch.dtype | None = None) -> VaceGenerator:
        transformer = WanVACETransformer3DModel.from_pretrained(
            self.cfg.base_model, subfolder=TRANSFORMER_FOLDER, torch_dtype=torch_dtype
        )
        transformer.add_adapter(self.lora_config(), adapter_name=ADAPTER_NAME)
        return VaceGenerator(transformer)

    def trainable_names(self, generator: nn.Module, stage: str) -> set[str]:
        """adapter: the LoRA; full and scratch: every weight (the generator is the transformer alone)."""
        if check_stage(stage) == "adapter":
            return self.adapter_names(generator)
        return {name for name, _ in generator.named_parameters()}

    def predict(
        self,
        generator: nn.Module,
        batch: dict[str, torch.Tensor],
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor,
        keep_text: torch.Tensor | None = None,
        keep_product: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """batch: control_latents (B, 96, T', h, w), text_embeds (B, L, dim), reference_latents
        (B, N, 16, 1, h, w) with photo_mask (B, N). A sample sees only its present photos (none when
        keep_product is 0); samples with as many run as one forward, since padding frames would be
        attended to. The references' noise (vace_velocity) comes from torch's global generator."""
        text = batch["text_embeds"]
        if keep_text is not None:
            text = text * keep_text.view(-1, 1, 1).to(text.dtype)
        present = batch["photo_mask"].bool()
        if keep_product is not None:
            present = present & keep_product.view(-1, 1).bool()
        counts = present.sum(dim=1)
        rows_by_count = [(counts == count).nonzero().flatten() for count in counts.unique()]
        pieces = []
        for rows in rows_by_count:
            references = torch.stack([batch["reference_latents"][row][present[row]] for row in rows])
            pieces.append(
                vace_velocity(
                    generator.transformer,
                    noisy_latents[rows],
                    timestep[rows],
                    text[rows],
                    batch["control_latents"][rows],
                    references,
                )
            )
        order = torch.cat(rows_by_count)
        return torch.cat(pieces)[torch.argsort(order)]

    # -- the trained folder -------------------------------------------------------------------

    def adapter_names(self, generator: nn.Module) -> set[str]:
        return {name for name, _ in generator.named_parameters() if ".lora_" in name}

    def save_generator(self, generator: nn.Module, folder: Path, adapter_only: bool) -> None:
        """The LoRA always (diffusers' LoRA file); a full save adds the transformer's own weights."""
        folder = Path(folder)
        transformer = generator.transformer
        transformer.save_lora_adapter(folder / LORA_FOLDER, adapter_name=ADAPTER_NAME)
        if adapter_only:
            return
        own = {
            name.replace(".base_layer.", "."): tensor
            for name, tensor in transformer.state_dict().items()
            if ".lora_" not in name
        }
        transformer.save_config(folder / TRANSFORMER_FOLDER)
        # diffusers' own weight file names, so that WanVACETransformer3DModel.from_pretrained reads them
        save_torch_state_dict(
            own, folder / TRANSFORMER_FOLDER, filename_pattern="diffusion_pytorch_model{suffix}.safetensors"
        )

    def load_generator(self, folder: Path, torch_dtype: torch.dtype | None = None) -> VaceGenerator:
        folder = Path(folder)
        full = (folder / TRANSFORMER_FOLDER / "config.json").is_file()
        transformer = WanVACETransformer3DModel.from_pretrained(
            str(folder) if full else self.cfg.base_model, subfolder=TRANSFORMER_FOLDER, torch_dtype=torch_dtype
        )
        transformer.load_lora_adapter(
            str(folder / LORA_FOLDER), prefix=None, adapter_name=ADAPTER_NAME, use_safetensors=True
        )
        return VaceGenerator(transformer)

    # -- generation ---------------------------------------------------------------------------

    def pipeline(self, generator: nn.Module, torch_dtype: torch.dtype | None = None) -> VaceProductPipeline:
        return VaceProductPipeline.from_generator(generator, self.cfg, torch_dtype)

    def speed_up_training(
        self, generator: nn.Module, checkpointing: str, compile_blocks: bool, device: torch.device
    ) -> None:
        """diffusers' own checkpointing of every block ("selective" falls back to it: the selective
        policy of models/speed.py is written for the product DiT's blocks); no compilation yet."""
        if checkpointing != "none":
            generator.transformer.enable_gradient_checkpointing()

    def speed_up_generation(
        self, pipeline, compile_blocks: bool, step_cache_threshold: float | None, device: torch.device | str
    ) -> None:
        """Regional compilation on CUDA; never the step cache (VaceProductPipeline says why)."""
        if compile_blocks and torch.device(device).type == "cuda":
            pipeline.transformer.compile_repeated_blocks()


class VaceProductPipeline(WanVACEPipeline):
    """WanVACEPipeline called as models.pipeline.ProductVideoPipeline is.

    Each sample runs diffusers' own VACE call (it generates one video at a time) with the grey-filled
    masked video, the mask and the photos on their white canvases as `reference_images`; the output
    is composited so pixels outside the mask are the input's. The text embeddings are the project's
    (models.pipeline.encode_text, as training stores them) and the null text without a negative
    prompt is zeros, training's text dropout. product_guidance_scale is unused: diffusers' VACE
    guides on the text alone (guidance_scale = text_guidance_scale), the photos are in both branches.

    The step cache stays off (VaceSpecification.speed_up_generation): VACE adds its hints to the
    hidden states between the blocks, so on a skipped step they would come again on top of First
    Block Cache's cached residual.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        scheduler,
        transformer=None,
        transformer_2=None,
        boundary_ratio: float | None = None,
        text_max_length: int = 512,
        max_product_images: int = 5,
    ):
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio,
        )
        self.register_to_config(text_max_length=text_max_length, max_product_images=max_product_images)

    @classmethod
    def from_generator(
        cls, generator: VaceGenerator, cfg: ModelConfig, torch_dtype: torch.dtype | None = None
    ) -> VaceProductPipeline:
        """The generator's transformer with cfg's UMT5, tokenizer, scheduler and VAE (float32)."""
        base = cfg.base_model
        return cls(
            tokenizer=AutoTokenizer.from_pretrained(base, subfolder="tokenizer"),
            text_encoder=UMT5EncoderModel.from_pretrained(base, subfolder="text_encoder", dtype=torch_dtype),
            vae=AutoencoderKLWan.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32),
            scheduler=make_scheduler(cfg.sampler.scheduler, cfg.flow_shift),
            transformer=generator.transformer,
            text_max_length=cfg.text_max_length,
            max_product_images=cfg.max_product_images,
        )

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
        callback=None,
        attention_backend: str = "cudnn",
        guidance_interval: tuple[float, float] | None = None,
        joint_guidance_scale: float | None = None,
    ):
        """As ProductVideoPipeline.__call__; a sample's empty photo list means no reference images.
        diffusers' VACE loop guides every step on the text alone: no guidance interval, no joint branch."""
        if guidance_interval is not None or joint_guidance_scale is not None:
            raise ValueError(
                "the vace backend guides every step on the text alone (diffusers' loop): "
                "set model.sampler.guidance_interval and joint_guidance_scale to null"
            )
        batch, channels, frames, height, width = masked_video.shape
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if channels != 3 or mask.shape != (batch, 1, frames, height, width):
            raise ValueError(
                f"masked_video must be (B, 3, T, H, W) and mask (B, 1, T, H, W); got "
                f"{tuple(masked_video.shape)} and {tuple(mask.shape)}"
            )
        if len(product_images) != batch or len(prompts) != batch:
            raise ValueError(f"batch {batch}: got {len(product_images)} image lists and {len(prompts)} prompts")
        latent_frames = (frames - 1) // self.vae_scale_factor_temporal + 1
        if max(len(photos) for photos in product_images) > latent_frames:
            # diffusers 0.42.1's WanVACEPipeline.prepare_masks takes the references' zero mask frames
            # from the video's latent frames, so more references than latent frames fail there.
            raise ValueError(
                f"{frames} frames make {latent_frames} latent frames: diffusers' VACE takes at most "
                f"that many reference photos, got {max(len(p) for p in product_images)}"
            )
        device = self._execution_device
        dtype = self.transformer.dtype
        text, null_text = encode_prompts(
            self.tokenizer, self.text_encoder, prompts, negative_prompt, self.config.text_max_length, dtype
        )
        mask = mask.to(device, torch.float32)
        video = grey_filled(masked_video.to(device, torch.float32), mask)
        latents = []
        with speed.attention(attention_backend, device):
            for index in range(batch):
                references = [reference_canvas(photo, height, width) for photo in product_images[index]]
                sample = super().__call__(
                    video=video[index : index + 1].transpose(1, 2),
                    mask=mask[index : index + 1].expand(-1, 3, -1, -1, -1).transpose(1, 2),
                    reference_images=references or None,
                    prompt_embeds=text[index : index + 1],
                    negative_prompt_embeds=null_text[index : index + 1],
                    height=height,
                    width=width,
                    num_frames=frames,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=text_guidance_scale,
                    generator=generator,
                    output_type="latent",
                    return_dict=False,
                    callback_on_step_end=step_progress(
                        callback, index * num_inference_steps, batch * num_inference_steps
                    ),
                )[0]
                latents.append(sample[:, :, len(references) :])  # diffusers strips the references only when decoding
        return finish(
            self.vae, torch.cat(latents), masked_video.to(device, torch.float32), mask, feather_px, output_type
        )
