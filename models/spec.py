"""Model specifications: one object per backend owns everything that differs between model families.

As finetrainers separates its `ModelSpecification` from the trainers, the rest of the project
(precompute, the training loop, the model store, evaluation, generation) never loads an encoder,
builds a DiT or decides which weights train: it asks the specification of `model.backend`.

A specification answers:
- precompute: which frozen encoders exist (`load_encoders`), what a clip is stored as
  (`encode_clip`) and what a product's photos are stored as (`encode_product`, once per product);
- training: the generator with fresh new weights on the base (`build_generator`), which weights a
  training stage trains (`trainable_names`), the velocity for a batch (`predict`), how stored
  samples stack into a batch (`collate`);
- the trained folder: which weights an adapter save keeps (`adapter_names`), `save_generator`,
  `load_generator`;
- generation: a diffusers pipeline around the generator (`pipeline`) whose `__call__` takes
  (masked_video, mask, product_images, prompt, ...) like models.pipeline.ProductVideoPipeline.

Backends: `product` (models/product_spec.py: the Wan2.1 T2V DiT with reference latents and/or the
CLIP product adapter) and `vace` (models/vace.py: diffusers' Wan2.1-VACE).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from models.config import ModelConfig

# Training stages by name: `adapter` trains only the new weights (and LoRAs), `full` also the
# base DiT blocks, `scratch` every weight of the generator (a model trained from random init).
STAGE_NAMES = ("adapter", "full", "scratch")


class ModelSpecification(ABC):
    """The backend of one (resolved) model config: `base_model` is a folder or hub id, never `tiny`."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    # -- precompute ---------------------------------------------------------------------------

    @abstractmethod
    def load_encoders(self, device: torch.device, dtype: torch.dtype) -> Any:
        """The frozen encoders precompute runs (VAE in float32, text encoder, ...), on `device`;
        a missing weight raises OSError/ValueError naming what to download."""

    @abstractmethod
    def encode_clip(
        self, encoders: Any, video: torch.Tensor, mask: torch.Tensor, prompt: str
    ) -> dict[str, torch.Tensor]:
        """A clip window (video (3, T, H, W) in [0, 1], mask (1, T, H, W) in {0, 1}, the prompt) ->
        the tensors training reads for it (on the CPU)."""

    @abstractmethod
    def encode_product(
        self, encoders: Any, photos: list[np.ndarray], height: int, width: int
    ) -> dict[str, torch.Tensor]:
        """A product's photos (RGBA or RGB uint8 cut-outs) -> its stored tensors, each with the
        photos as first dimension; encoded once per product and shared by its clips."""

    @abstractmethod
    def collate(self, samples: list[dict[str, torch.Tensor]], photos: int | None = None) -> dict[str, torch.Tensor]:
        """Stack stored samples (clip tensors | product tensors) into a batch; product tensors are
        padded to `photos` (default: the most any sample has) with a `photo_mask` (B, N) bool."""

    # -- training -----------------------------------------------------------------------------

    @abstractmethod
    def build_generator(self, torch_dtype: torch.dtype | None = None) -> nn.Module:
        """The base weights (`from_pretrained`) with fresh new weights, initialised so that the
        untrained generator computes the base model's function where that is possible."""

    @abstractmethod
    def trainable_names(self, generator: nn.Module, stage: str) -> set[str]:
        """Parameter names (as generator.named_parameters()) that train in `stage` (STAGE_NAMES)."""

    @abstractmethod
    def predict(
        self,
        generator: nn.Module,
        batch: dict[str, torch.Tensor],
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor,
        keep_text: torch.Tensor | None = None,
        keep_product: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The predicted velocity for the video latents only (B, 16, T', h, w); keep_* (B,) in
        {0, 1} drop a sample's text / product condition (the nulls of guidance)."""

    # -- the trained folder -------------------------------------------------------------------

    @abstractmethod
    def adapter_names(self, generator: nn.Module) -> set[str]:
        """The weights an adapter-only save keeps: everything the base checkpoint does not hold."""

    @abstractmethod
    def save_generator(self, generator: nn.Module, folder: Path, adapter_only: bool) -> None:
        """Write the generator under `folder` (adapter_only: adapter_names only, megabytes)."""

    @abstractmethod
    def load_generator(self, folder: Path, torch_dtype: torch.dtype | None = None) -> nn.Module:
        """Inverse of save_generator, with the base from this config when the folder holds an adapter."""

    # -- generation ---------------------------------------------------------------------------

    @abstractmethod
    def pipeline(self, generator: nn.Module, torch_dtype: torch.dtype | None = None):
        """A diffusers pipeline around `generator` with this config's frozen components; its
        `__call__` takes models.pipeline.ProductVideoPipeline's arguments."""

    # -- speed (models/speed.py, docs/performance.md) -----------------------------------------

    @abstractmethod
    def speed_up_training(
        self, generator: nn.Module, checkpointing: str, compile_blocks: bool, device: torch.device
    ) -> None:
        """Activation checkpointing ("selective" / "full" / "none") and compiled blocks (CUDA)."""

    @abstractmethod
    def speed_up_generation(
        self, pipeline, compile_blocks: bool, step_cache_threshold: float | None, device: torch.device | str
    ) -> None:
        """Compiled blocks (CUDA) and, where the backend allows it, a First Block Cache at
        `step_cache_threshold` (None: every step exact, what generation and evaluation run)."""

    def enable_step_cache(self, pipeline, cache, steps: int | None = None) -> None:
        """Put a calibrated step cache (models.speed.StepCache, None: exact) on the pipeline's
        denoiser for calls of `steps` steps; a backend that cannot skip steps refuses it."""
        if cache is not None:
            raise ValueError(f"the {self.cfg.backend} backend takes no step cache: every step is computed")


def check_stage(stage: str) -> str:
    if stage not in STAGE_NAMES:
        raise ValueError(f"unknown training stage {stage!r}: choose one of {', '.join(STAGE_NAMES)}")
    return stage


def set_trainable(model: nn.Module, names: set[str]) -> set[str]:
    """requires_grad for exactly `names`; returns them (hand them to the optimizer)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
    return names


def specification(cfg: ModelConfig) -> ModelSpecification:
    """The specification of a resolved model config's backend."""
    if cfg.backend == "vace":
        from models.vace import VaceSpecification

        return VaceSpecification(cfg)
    from models.product_spec import ProductSpecification

    return ProductSpecification(cfg)
