"""The `product` backend: a Wan2.1 text-to-video DiT with the project's conditioning (models/transformer.py).

What the model reads (docs/model.md):
- per clip: the clean video latents, the latents of the masked video (its region filled with
  model.masked_fill), the packed mask, the prompt's UMT5 embedding;
- per product, encoded once and shared by its clips: the photos' VAE latents on a neutral canvas
  of the clip's size (`reference: latents | both`) and/or their CLIP tokens (`clip | both`).

Training stages (models.spec.STAGE_NAMES): `adapter` trains the new weights (widened patch
embedding, the gated reference attention's gates and LoRA, the product cross-attention and
encoder); `full` adds every DiT block; `scratch` trains every weight (a DiT from random init, whose
time / text embedders and output head are random too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from models import speed
from models.pipeline import (
    ProductVideoPipeline,
    encode_reference_photos,
    encode_text,
    encode_video,
    fill_masked,
    flatten_alpha,
    make_scheduler,
    pad_photos,
)
from models.product_encoder import ProductEncoder, encode_product_images
from models.spec import ModelSpecification, check_stage
from models.transformer import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ProductVideoGenerator, pack_mask

CLIP_KEYS = ("latents", "masked_latents", "packed_mask", "text_embeds")


@dataclass
class ProductEncoders:
    """The frozen encoders precompute runs; the CLIP pair only when CLIP tokens condition the model."""

    vae: AutoencoderKLWan
    tokenizer: object
    text_encoder: UMT5EncoderModel
    image_encoder: CLIPVisionModel | None
    image_processor: CLIPImageProcessor | None


class ProductSpecification(ModelSpecification):
    """models/spec.py's interface for ProductVideoGenerator."""

    @property
    def uses_reference_latents(self) -> bool:
        return self.cfg.reference in ("latents", "both")

    @property
    def uses_clip(self) -> bool:
        return self.cfg.reference in ("clip", "both")

    # -- frozen components --------------------------------------------------------------------

    def _vae(self) -> AutoencoderKLWan:  # float32, as diffusers' Wan examples keep it
        return AutoencoderKLWan.from_pretrained(self.cfg.base_model, subfolder="vae", torch_dtype=torch.float32)

    def _text_encoder(self, dtype) -> tuple[object, UMT5EncoderModel]:
        return (
            AutoTokenizer.from_pretrained(self.cfg.base_model, subfolder="tokenizer"),
            UMT5EncoderModel.from_pretrained(self.cfg.base_model, subfolder="text_encoder", dtype=dtype),
        )

    def _image_encoder(self, dtype) -> tuple[CLIPVisionModel | None, CLIPImageProcessor | None]:
        if not self.uses_clip:
            return None, None
        cfg = self.cfg
        return (
            CLIPVisionModel.from_pretrained(cfg.image_encoder, subfolder=cfg.image_encoder_subfolder, dtype=dtype),
            CLIPImageProcessor.from_pretrained(cfg.image_encoder, subfolder=cfg.image_processor_subfolder),
        )

    # -- precompute ---------------------------------------------------------------------------

    def load_encoders(self, device: torch.device, dtype: torch.dtype) -> ProductEncoders:
        tokenizer, text_encoder = self._text_encoder(dtype)
        image_encoder, image_processor = self._image_encoder(dtype)
        return ProductEncoders(
            vae=self._vae().to(device).eval(),
            tokenizer=tokenizer,
            text_encoder=text_encoder.to(device).eval(),
            image_encoder=None if image_encoder is None else image_encoder.to(device).eval(),
            image_processor=image_processor,
        )

    @torch.no_grad()
    def encode_clip(
        self, encoders: ProductEncoders, video: torch.Tensor, mask: torch.Tensor, prompt: str
    ) -> dict[str, torch.Tensor]:
        device = next(encoders.vae.parameters()).device
        both = torch.stack([video, fill_masked(video, mask, self.cfg.masked_fill)]).to(device)
        latents, masked_latents = encode_video(encoders.vae, both)
        packed = pack_mask(mask.unsqueeze(0).to(device), latents.shape[-2:])[0]
        text = encode_text(encoders.tokenizer, encoders.text_encoder, [prompt], self.cfg.text_max_length)[0]
        tensors = {"latents": latents, "masked_latents": masked_latents, "packed_mask": packed, "text_embeds": text}
        return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}

    @torch.no_grad()
    def encode_product(
        self, encoders: ProductEncoders, photos: list[np.ndarray], height: int, width: int
    ) -> dict[str, torch.Tensor]:
        tensors = {}
        if self.uses_clip:  # CLIP sees a product page's white behind a cut-out
            tokens, _ = encode_product_images(
                encoders.image_encoder,
                encoders.image_processor,
                [[flatten_alpha(photo, 1.0) for photo in photos]],
                len(photos),
            )
            tensors["image_tokens"] = tokens[0]
        if self.uses_reference_latents:
            tensors["reference_latents"] = encode_reference_photos(encoders.vae, photos, height, width)
        return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}

    def collate(self, samples: list[dict[str, torch.Tensor]], photos: int | None = None) -> dict[str, torch.Tensor]:
        batch = {name: torch.stack([s[name].float() for s in samples]) for name in CLIP_KEYS}
        for name in ("image_tokens", "reference_latents"):
            if name in samples[0]:
                batch[name], batch["photo_mask"] = pad_photos([s[name].float() for s in samples], photos)
        return batch

    # -- training -----------------------------------------------------------------------------

    def build_generator(self, torch_dtype: torch.dtype | None = None) -> ProductVideoGenerator:
        return ProductVideoGenerator.from_model_config(self.cfg, torch_dtype=torch_dtype)

    def adapter_names(self, generator: nn.Module) -> set[str]:
        names = {f"transformer.{name}" for name in generator.transformer.adapter_parameter_names()}
        return names | {name for name, _ in generator.named_parameters() if name.startswith("product_encoder.")}

    def trainable_names(self, generator: nn.Module, stage: str) -> set[str]:
        names = {name for name, _ in generator.named_parameters()}
        if check_stage(stage) == "scratch":
            return names
        adapter = self.adapter_names(generator)
        if stage == "adapter":
            return adapter
        return adapter | {name for name in names if name.startswith("transformer.wan.blocks.")}

    def predict(
        self,
        generator: nn.Module,
        batch: dict[str, torch.Tensor],
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor,
        keep_text: torch.Tensor | None = None,
        keep_product: torch.Tensor | None = None,
    ) -> torch.Tensor:
        photo_mask = batch.get("photo_mask")
        return generator(
            noisy_latents,
            batch["masked_latents"],
            batch["packed_mask"],
            timestep,
            batch["text_embeds"],
            image_tokens=batch.get("image_tokens"),
            image_mask=photo_mask,
            reference_latents=batch.get("reference_latents"),
            photo_mask=photo_mask,
            keep_text=keep_text,
            keep_product=keep_product,
        )

    # -- the trained folder -------------------------------------------------------------------

    def save_generator(self, generator: nn.Module, folder: Path, adapter_only: bool) -> None:
        generator.save_pretrained(folder, adapter_only=adapter_only)

    def load_generator(self, folder: Path, torch_dtype: torch.dtype | None = None) -> ProductVideoGenerator:
        """An adapter folder takes its base from this config (not the path it was saved with), so
        a model folder stays portable."""
        folder = Path(folder)
        if not (folder / "transformer" / ADAPTER_CONFIG_NAME).is_file():
            generator = ProductVideoGenerator.from_pretrained(folder, torch_dtype=torch_dtype)
            self._check_matches(generator, folder)
            return generator
        generator = self.build_generator(torch_dtype)
        weights = load_file(str(folder / "transformer" / ADAPTER_WEIGHTS_NAME))
        expected = set(generator.transformer.adapter_parameter_names())
        if set(weights) != expected:
            raise ValueError(
                f"{folder}: adapter weights do not match the model of this config: missing "
                f"{sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]}"
            )
        generator.transformer.load_state_dict(weights, strict=False)
        if generator.product_encoder is not None:
            generator.product_encoder = ProductEncoder.from_pretrained(
                folder, subfolder="product_encoder", torch_dtype=torch_dtype
            )
        return generator

    def _check_matches(self, generator: ProductVideoGenerator, folder: Path) -> None:
        """A full save carries its own config: it must be the generator this config describes."""
        cfg, found = self.cfg, generator.transformer.config
        pairs = {
            name: (found[name], getattr(cfg, name))
            for name in (
                "reference",
                "reference_attention",
                "reference_lora_rank",
                "num_product_tokens",
                "inject_layers",
                "product_attention_heads",
            )
        }
        if generator.product_encoder is not None:
            encoder = generator.product_encoder.config
            pairs |= {
                "product_hidden_dim": (encoder.hidden_dim, cfg.product_hidden_dim),
                "product_num_heads": (encoder.num_heads, cfg.product_num_heads),
            }
        differences = [f"{name}: weights {a!r} vs config {b!r}" for name, (a, b) in pairs.items() if a != b]
        if differences:
            raise ValueError(f"{folder} holds a generator of another config ({'; '.join(differences)})")

    # -- generation ---------------------------------------------------------------------------

    def pipeline(self, generator: nn.Module, torch_dtype: torch.dtype | None = None) -> ProductVideoPipeline:
        tokenizer, text_encoder = self._text_encoder(torch_dtype)
        image_encoder, image_processor = self._image_encoder(torch_dtype)
        return ProductVideoPipeline(
            vae=self._vae(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=generator.transformer,
            scheduler=make_scheduler(self.cfg.sampler.scheduler, self.cfg.flow_shift),
            image_encoder=image_encoder,
            image_processor=image_processor,
            product_encoder=generator.product_encoder,
            text_max_length=self.cfg.text_max_length,
            max_product_images=self.cfg.max_product_images,
            masked_fill=self.cfg.masked_fill,
        )

    def speed_up_training(
        self, generator: nn.Module, checkpointing: str, compile_blocks: bool, device: torch.device
    ) -> None:
        speed.apply_training_speed(generator.transformer, checkpointing, compile_blocks, device)

    def speed_up_generation(
        self,
        pipeline: ProductVideoPipeline,
        compile_blocks: bool,
        step_cache_threshold: float | None,
        device: torch.device | str,
    ) -> None:
        speed.apply_generation_speed(pipeline.transformer, compile_blocks, step_cache_threshold, device)

    def enable_step_cache(self, pipeline: ProductVideoPipeline, cache, steps: int | None = None) -> None:
        speed.enable_step_cache(pipeline.transformer, cache, steps)
