"""Model configuration: the `model:` section of configs/model/*.yaml as a pydantic object.

One YAML names everything the generator needs: where the Wan2.1 base (transformer, VAE, UMT5
text encoder, tokenizer) and the CLIP image encoder come from, the product adapter's shape, the
training objective and the sampler. `base_model: tiny` means "random tiny components built by
models.tiny" (CPU tests and demo); `models.tiny.materialize_tiny` saves them to a folder and
returns a config pointing at it, so tests load through the same `from_pretrained` path as users.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TINY = "tiny"


class ObjectiveConfig(BaseModel):
    """Rectified-flow training objective (see docs/model.md, "Objective").

    x_s = (1 - s) x0 + s e, the model predicts v = e - x0. s is drawn from `timestep_sampling`
    (uniform, or logit-normal with `logit_mean`/`logit_std`), then shifted with
    s' = shift s / (1 + (shift - 1) s), the same map the sampler's flow_shift applies to its grid.
    """

    model_config = ConfigDict(extra="forbid")

    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = Field(3.0, gt=0)
    # Loss weight is 1 outside the mask and 1 + masked_region_weight inside (latent cells are
    # weighted by the fraction of their pixels under the mask).
    masked_region_weight: float = Field(0.0, ge=0)
    # L = L_flow + mask_loss_weight * L_mask, L_mask the squared velocity error averaged over the
    # masked latent cells alone (weighted by their masked fraction): however small the product,
    # its region weighs this much (OmniInsert's subject-mask loss; docs/model.md, "Objective").
    mask_loss_weight: float = Field(0.0, ge=0)
    # Condition dropout for classifier-free guidance; the three outcomes are drawn per sample:
    # drop both, drop only the product, drop only the text.
    drop_text_prob: float = Field(0.1, ge=0, le=1)
    drop_product_prob: float = Field(0.1, ge=0, le=1)
    drop_both_prob: float = Field(0.05, ge=0, le=1)


class SamplerConfig(BaseModel):
    """Defaults of the generation call (each can be overridden per call)."""

    model_config = ConfigDict(extra="forbid")

    scheduler: Literal["unipc", "euler"] = "unipc"
    num_inference_steps: int = Field(50, ge=1)
    text_guidance_scale: float = 5.0
    product_guidance_scale: float = 3.0
    feather_px: int = Field(0, ge=0)
    # None: zero text embeddings, the null that training's text dropout uses; a string is encoded.
    negative_prompt: str | None = None
    # Speed (models/speed.py, docs/performance.md). The plain diffusers path is
    # attention: default, compile: false, step_cache_threshold: null.
    attention: Literal["cudnn", "default"] = "cudnn"  # cuDNN's fused attention first (CUDA)
    compile: bool = True  # torch.compile the Wan blocks (CUDA only)
    # diffusers' First Block Cache: skip the other blocks while the first block's output has
    # changed by less than this (relative) since the last full step; null = every step exact.
    # 0.2 cost the PoC model 0.02 dB of mask PSNR (docs/performance.md); re-measure on a new model
    # with `python -m experiments.poc step-cache --model URI`.
    step_cache_threshold: float | None = Field(0.2, gt=0)

    def plain(self) -> SamplerConfig:
        """These settings on diffusers' plain path: every step exact, eager, PyTorch's attention order."""
        return self.model_copy(update={"attention": "default", "compile": False, "step_cache_threshold": None})


class ModelConfig(BaseModel):
    """Where the components come from, how the photos condition the model, the adapter's shape."""

    model_config = ConfigDict(extra="forbid")

    # product: a Wan2.1 text-to-video DiT with the project's conditioning (models/product_spec.py);
    # vace: diffusers' Wan2.1-VACE, zero-shot or LoRA-fine-tuned (models/vace.py).
    backend: Literal["product", "vace"] = "product"
    # How the photos reach the DiT (docs/model.md, "Reference conditioning"): latents = their VAE
    # latents as clean reference tokens in self-attention; clip = CLIP tokens -> resampler -> gated
    # cross-attention (the seed plan's path); both = the two.
    reference: Literal["latents", "clip", "both"] = "latents"
    # joint: one softmax over video and reference tokens (Phantom, Concat-ID: training from scratch
    # or full fine-tuning); gated: video attention + per-head gate (at 0) x attention over the
    # reference alone, with a LoRA on the reference branch (Stand-In: keeps a pretrained T2V exact).
    reference_attention: Literal["joint", "gated"] = "joint"
    reference_lora_rank: int = Field(16, ge=1)  # gated mode's LoRA on the reference tokens' q/k/v
    # What fills the masked region of the video the model sees: grey (0 in [-1, 1], as Wan I2V and
    # VACE) or black (the dataset's masked_videos/, which stay as the seed plan defines them).
    masked_fill: Literal["grey", "black"] = "grey"

    # Hub id or local folder of a diffusers Wan2.1 model (subfolders transformer/, vae/,
    # text_encoder/, tokenizer/), or "tiny".
    base_model: str
    # Hub id or folder holding the CLIP ViT image encoder (transformers CLIPVisionModel) and its
    # CLIPImageProcessor, for `reference: clip | both`; Wan2.1-T2V has none, the I2V repos ship ViT-H/14.
    image_encoder: str | None = None
    image_encoder_subfolder: str | None = "image_encoder"
    image_processor_subfolder: str | None = "image_processor"
    text_max_length: int = Field(512, ge=1)  # UMT5 tokens, zero-padded as Wan does

    # Product encoder (seed 4.3): K query tokens resampling all image tokens.
    num_product_tokens: int = Field(64, ge=1, le=256)
    product_hidden_dim: int = Field(1024, ge=8)
    product_num_heads: int = Field(16, ge=1)
    max_product_images: int = Field(5, ge=1)

    # DiT modification: product cross-attention in these blocks ("all" or block indices).
    inject_layers: Literal["all"] | list[int] = "all"
    # Heads (of Wan's head_dim, 128) per product attention; None = as many as the DiT. Each
    # injected block adds ~4 x dim x heads x 128 weights: this sets the stage-1 adapter's size.
    product_attention_heads: int | None = Field(None, ge=1)
    # Wan I2V's layout: first frame repeated 4x, every 4 frames folded into 4 channels per latent
    # frame (docs/model.md says why this and not VACE's 8x8 pixel-unshuffle).
    mask_packing: Literal["temporal_fold"] = "temporal_fold"

    flow_shift: float = Field(3.0, gt=0)
    objective: ObjectiveConfig = ObjectiveConfig()
    sampler: SamplerConfig = SamplerConfig()

    @model_validator(mode="after")
    def _clip_needs_an_image_encoder(self) -> ModelConfig:
        if self.reference in ("clip", "both") and not self.image_encoder:
            raise ValueError(f"reference {self.reference!r} uses CLIP tokens of the photos: set model.image_encoder")
        return self

    @field_validator("inject_layers")
    @classmethod
    def _layers_are_unique(cls, value):
        if isinstance(value, list) and (len(set(value)) != len(value) or any(i < 0 for i in value)):
            raise ValueError(f"inject_layers must be distinct non-negative block indices, got {value}")
        return value


def load_model_config(path: str | Path) -> ModelConfig:
    """Read the `model:` section of a YAML file (a file may hold only that section's content)."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with a `model:` section")
    return ModelConfig.model_validate(data.get("model", data))
