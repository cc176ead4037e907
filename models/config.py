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
# The sampler key of the First Block Cache every model had before calibration (SamplerConfig).
LEGACY_STEP_CACHE_KEY = "step_cache_threshold"


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
    """Defaults of the generation call (each can be overridden per call).

    Every step is computed: no setting here skips one. A step cache is a property of one trained
    model, not of a config: the evaluate flow's `--calibrate` measures it on the model and records
    it on its registry version, and `python -m flows.generate --fast` uses that record
    (docs/performance.md).
    """

    model_config = ConfigDict(extra="forbid")

    scheduler: Literal["unipc", "euler"] = "unipc"
    num_inference_steps: int = Field(50, ge=1)
    text_guidance_scale: float = 5.0
    product_guidance_scale: float = 3.0
    feather_px: int = Field(0, ge=0)
    # None: zero text embeddings, the null that training's text dropout uses; a string is encoded.
    negative_prompt: str | None = None
    # Speed (models/speed.py, docs/performance.md). The plain diffusers path is
    # attention: default, compile: false.
    attention: Literal["cudnn", "default"] = "cudnn"  # cuDNN's fused attention first (CUDA)
    compile: bool = True  # torch.compile the Wan blocks (CUDA only)
    # Guidance at less cost (models/pipeline.py), both off by default (every step guided, three
    # branches). guidance_interval [low, high]: guide only the steps whose noise level sigma (1 =
    # pure noise) lies in it, the others run the fully conditioned branch alone (Kynkaanniemi et
    # al. 2024, "Applying guidance in a limited interval"); [0, 1] guides every step.
    guidance_interval: tuple[float, float] | None = None
    # One branch with both conditions dropped instead of separate text and product branches:
    # v = v(null) + scale * (v(text, product) - v(null)), two branches instead of three; the two
    # guidance scales are then unused. Equal to the separate branches when both scales equal it.
    joint_guidance_scale: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_step_cache_setting(cls, data):
        # step_cache_threshold (a First Block Cache on every model, 0.2 by default) is gone. Model
        # folders saved with it load without it (tasks/training/model_store.read_run_config); null
        # is read as what it said, every step exact; a threshold set by hand is refused.
        if not isinstance(data, dict) or LEGACY_STEP_CACHE_KEY not in data:
            return data
        if data[LEGACY_STEP_CACHE_KEY] is not None:
            raise ValueError(
                f"model.sampler.{LEGACY_STEP_CACHE_KEY} is gone: generation computes every step; a step "
                "cache is calibrated per model (python -m flows.evaluate --calibrate) and used by "
                "python -m flows.generate --fast"
            )
        return {key: value for key, value in data.items() if key != LEGACY_STEP_CACHE_KEY}

    @field_validator("guidance_interval")
    @classmethod
    def _interval_in_range(cls, value):
        if value is not None and not 0 <= value[0] <= value[1] <= 1:
            raise ValueError(f"guidance_interval must be [low, high] with 0 <= low <= high <= 1, got {list(value)}")
        return value

    def plain(self) -> SamplerConfig:
        """These settings on diffusers' plain path: eager, PyTorch's attention order."""
        return self.model_copy(update={"attention": "default", "compile": False})

    def guidance_options(self) -> dict:
        """The pipeline call's arguments for guidance at less cost: only those that are on (a
        pipeline without them, VACE's, is called as before)."""
        options = {"guidance_interval": self.guidance_interval, "joint_guidance_scale": self.joint_guidance_scale}
        return {key: value for key, value in options.items() if value is not None}


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
